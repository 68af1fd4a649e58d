"""Which launch configurations a Triton kernel of this package autotunes over, and the
autotuner that keeps each choice once per cache folder."""

import hashlib
import os
import time
from pathlib import Path

import triton
from filelock import FileLock
from triton import knobs
from triton.runtime.autotuner import Autotuner

from arch.kernels import PAID

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# HYBRIDSCALE_AUTOTUNE=0 skips the search: every config compiles for seconds on a GPU, so
# a kernel with many takes minutes to start; quick runs and correctness tests take the first.
SEARCH = os.environ.get("HYBRIDSCALE_AUTOTUNE", "1") != "0"


def choices(configs: list[triton.Config], small: triton.Config) -> list[triton.Config]:
    """``configs`` on the GPU (the first alone without the search); ``small`` under the
    interpreter, so that tiny test shapes still span several blocks."""
    if INTERPRET:
        return [small]
    return configs if SEARCH else configs[:1]


class _SharedAutotuner(Autotuner):
    """Triton's autotuner with its choices kept on disk (Triton's cache folder,
    TRITON_CACHE_DIR), searched by one process at a time: trials of one shape started
    together would each search, for minutes; the later ones wait and read the choice."""

    def check_disk_cache(self, tuning_key, configs, bench_fn) -> bool:
        name = getattr(self.base_fn, "__name__", "kernel")
        digest = hashlib.sha256(f"{name} {tuning_key} {configs}".encode()).hexdigest()[:24]
        locks = Path(knobs.cache.dir) / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(locks / f"autotune-{digest}.lock"):
            start = time.perf_counter()
            hit = super().check_disk_cache(tuning_key, configs, bench_fn)
        if hit:
            PAID["autotune_cache_hits"] += 1
        else:
            PAID["autotunes"] += 1
            PAID["autotune_s"] += time.perf_counter() - start
        return hit


def autotune(configs: list[triton.Config], key: list[str], reset_to_zero=None, restore_value=None):
    """``triton.autotune(configs, key, ..., cache_results=True)``, searching once per
    kernel, key and cache folder however many processes ask (see _SharedAutotuner)."""

    def decorator(fn):
        return _SharedAutotuner(fn, fn.arg_names, configs, key, reset_to_zero, restore_value,
                                cache_results=True)  # fmt: skip

    return decorator
