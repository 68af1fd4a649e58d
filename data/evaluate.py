"""What the trainer measures at intervals and at the end: validation loss, bits per byte
(comparable across tokenizers), probe accuracy and answer loss, and local tasks' accuracy
and answer loss."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from data.loader import TokenWindows
from data.probes import EVAL_STREAM, IGNORE, probe_batch
from data.tasks import PreparedTask

BATCH_TOKENS = 8192  # tokens per forward pass: bounds the logits' memory at large vocabularies


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total loss in nats over the bytes of text its tokens stand for, in bits per byte."""
    return nats / math.log(2) / n_bytes


@torch.no_grad()
def validation_metrics(
    model, windows: TokenWindows, token_bytes: np.ndarray, max_tokens: int, device: torch.device
) -> dict:
    """Mean loss per token over disjoint validation windows, and bits per byte over the
    exact bytes of text the predicted tokens stand for."""
    nats, tokens, n_bytes = 0.0, 0, 0
    for rows in windows.sequential(max_tokens, max(1, BATCH_TOKENS // windows.seq_len)):
        inputs, targets = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
        logits = model(inputs.to(device)).float()
        nats += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten().to(device), reduction="sum"
        ).item()
        tokens += targets.numel()
        n_bytes += int(token_bytes[rows[:, 1:]].sum())
    return {"val_loss": nats / tokens, "val_bpb": bits_per_byte(nats, n_bytes)}


@torch.no_grad()
def probe_scores(
    model,
    name: str,
    tokenizer,
    token_bytes: np.ndarray,
    seq_len: int,
    device: torch.device,
    examples: int = 64,
    items: int | None = None,
) -> dict:
    """Over held-out examples 0..examples-1, teacher-forced: ``acc``, the fraction of answers
    (a value, a number, a copied string) whose every token is the model's top prediction,
    and ``bpb``, the loss of the correct answers in bits per byte of their text (the task
    loss that OLMo's model ladder fits, smooth where accuracy jumps)."""
    correct = answers = n_bytes = 0
    nats = 0.0
    rows_per_batch = max(1, BATCH_TOKENS // seq_len)
    for first in range(0, examples, rows_per_batch):
        seeds = [(EVAL_STREAM, i) for i in range(first, min(first + rows_per_batch, examples))]
        inputs, targets, spans = probe_batch(name, seeds, tokenizer, seq_len, items)
        logits = model(inputs.to(device)).float().cpu()
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        n_bytes += int(token_bytes[targets[targets != IGNORE].numpy()].sum())
        hits = (logits.argmax(-1) == targets).numpy()
        correct += sum(
            hits[row, start:end].all()
            for row, row_spans in enumerate(spans)
            for start, end in row_spans
        )
        answers += sum(len(row_spans) for row_spans in spans)
    return {"acc": correct / answers, "bpb": bits_per_byte(nats, n_bytes)}


@torch.no_grad()
def task_scores(
    model, task: PreparedTask, eot: int, token_bytes: np.ndarray, seq_len: int,
    device: torch.device,
) -> dict:  # fmt: skip
    """Every choice of every example scored as the question's continuation: ``acc``, the
    share of examples whose correct choice has the lowest loss (summed over its tokens, as
    lm-evaluation-harness's acc), and ``bpb``, the correct choice's loss in bits per byte of
    its text, averaged over examples (OLMo's model ladder's task loss); ``chance``, a
    uniform guess's accuracy, for the analysis to tell a task it cannot predict."""
    nats = np.empty(task.pairs)
    rows_per_batch = max(1, BATCH_TOKENS // seq_len)
    for first in range(0, task.pairs, rows_per_batch):
        pairs = range(first, min(first + rows_per_batch, task.pairs))
        inputs, targets = task.rows(pairs, eot, seq_len)
        logits = model(inputs.to(device)).float()
        losses = F.cross_entropy(logits.transpose(1, 2), targets.to(device), reduction="none")
        nats[first : pairs.stop] = losses.sum(-1).cpu().numpy()
    n_bytes = np.array([token_bytes[task.choice_tokens(p)].sum() for p in range(task.pairs)])
    # each example's choice of lowest loss (the first, on a tie)
    hits = [task.correct[pairs[np.argmin(nats[pairs])]] for pairs in task.by_example()]
    return {
        "acc": float(np.mean(hits)),
        "bpb": float(np.mean(nats[task.correct] / n_bytes[task.correct]) / math.log(2)),
        "chance": task.chance,
    }
