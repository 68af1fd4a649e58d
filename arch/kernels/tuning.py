"""Which launch configurations a Triton kernel of this package autotunes over."""

import os

import triton

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
