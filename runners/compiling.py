"""How a trial's training step is compiled, and the caches that let a study compile and
autotune each shape once rather than once per trial.

``training.compile`` resolves per device and size (``mode``). Compiled artifacts
(Inductor's graphs and kernels, Triton's kernels, our kernels' autotune choices) live in
one folder of the results (``shared_caches``), so a trial finds what an earlier trial of
its shape stored; trials of one shape started together take turns compiling their first
step (``first_of_shape``), so the later ones load rather than compile. ``paid`` counts
what this process has compiled and tuned, for the trainer to log.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from arch.kernels import PAID

# Trials below this many parameters capture their step in CUDA graphs under "auto": there
# the step is bound by launching kernels. Measured on an H100 (bench/RESULTS.md, batch
# 32 x 512): graphs trained 5.0-7.6x faster than eager at 1.2M parameters and 4.4-5.2x at
# 4.7-4.9M, 2.2-4.1x faster than compiled without them. Nothing between 5M and 350M is
# measured yet, so the default stops at 10M; HYBRIDSCALE_GRAPHS_BELOW moves it.
GRAPHS_BELOW = int(float(os.environ.get("HYBRIDSCALE_GRAPHS_BELOW", "1e7")))
_CACHE_VARS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def mode(setting: str | bool, device_type: str, params: int, one_pass: bool) -> str | None:
    """torch.compile's mode for ``training.compile`` (None: eager). "auto" compiles on
    CUDA only (on a CPU, compiling costs more than tests and smoke studies train), and
    captures CUDA graphs below GRAPHS_BELOW parameters when a step is one forward and
    backward on one worker (a replay overwrites the last one's outputs, a micro-batch's
    loss and gradients among them, and DDP's hooks run outside the graph)."""
    if setting == "auto":
        if device_type != "cuda":
            return None
        setting = "graphs" if one_pass and params < GRAPHS_BELOW else True
    if setting == "graphs":
        return "reduce-overhead"
    return "default" if setting else None


@contextlib.contextmanager
def shared_caches(folder: Path | None) -> Iterator[None]:
    """Inductor's and Triton's caches (ours' autotune choices among Triton's) under
    ``folder`` inside the block; torch's defaults when None. Both read the variables
    when they look for an entry, so setting them around a trial is enough."""
    if folder is None:
        yield
        return
    saved = {var: os.environ.get(var) for var in _CACHE_VARS}
    os.environ.update({var: str(folder / sub) for var, sub in _CACHE_VARS.items()})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


@contextlib.contextmanager
def first_of_shape(folder: Path | None, shape: str) -> Iterator[None]:
    """Hold the shape's lock in ``folder`` (nothing when None): one trial of a shape at a
    time runs the step that compiles and autotunes."""
    if folder is None:
        yield
        return
    (folder / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "locks" / f"step-{shape}.lock"):
        yield


def paid() -> dict[str, float]:
    """What this process has compiled and tuned so far: graphs Inductor compiled
    (compile_cache_misses) or loaded from its cache (compile_cache_hits), and our
    kernels' autotune searches (see arch.kernels.PAID)."""
    # Imported here: Dynamo imports Triton, which fixes TRITON_INTERPRET when imported, and
    # the interpreted kernel tests set it after the trainer's modules are loaded.
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {
        "compile_cache_misses": inductor["fxgraph_cache_miss"],
        "compile_cache_hits": inductor["fxgraph_cache_hit"],
        **PAID,
    }
