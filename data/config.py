"""The data's typed config: the corpus, its tokenizer, the sequences, the probe tasks and
local multiple-choice tasks."""

from typing import Annotated, Literal

from pydantic import PositiveInt, StringConstraints, model_validator

from arch.config import Count, Ratio, StrictModel, omitted_at_default

ProbeName = Literal["mqar", "phonebook", "copy", "selective_copy"]  # data/probes.py
# A task's name becomes part of its metrics' names, task_<name>_bpb
TaskName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class DataConfig(StrictModel):
    """Where the training text comes from and how it becomes token sequences."""

    paths: list[str] = []  # files or globs; empty: the built-in corpus below
    # Without paths: "stdlib", the standard library's sources (about 30 MB), or "python",
    # those and the installed packages' sources and docs (data/corpus.py builtin_sources)
    corpus: Literal["stdlib", "python"] = "stdlib"
    text_field: str = "text"  # the JSONL field or table column holding the text
    tokenizer: str = "byte"  # "byte", "bpe", or a path to a tokenizer.json
    bpe_vocab_size: PositiveInt = 8192
    seq_len: PositiveInt = 128
    val_fraction: Ratio = 0.01
    # Probe tasks (mqar, phonebook, copy, selective_copy) -> the fraction of training rows
    # they fill; every probe named here is evaluated (probe_<name>_acc and
    # the answers' loss, probe_<name>_bpb), 0.0 only that.
    probes: dict[ProbeName, Ratio] = {}
    eval_tokens: Count = 32768  # validation tokens per evaluation
    probe_examples: PositiveInt = 64  # held-out examples per probe per evaluation
    # Local multiple-choice tasks, name -> JSON or JSONL file (data/tasks.py), each scored
    # at every evaluation as task_<name>_bpb and task_<name>_acc
    tasks: dict[TaskName, str] = omitted_at_default({})

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if sum(self.probes.values()) > 1:
            raise ValueError(f"probes: fractions {dict(self.probes)} add up to more than 1")
        return self
