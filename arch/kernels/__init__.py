"""Fused Triton kernels for the Mamba-2 mixer; the PyTorch reference is ``arch.ssd`` and
``arch.layers.mamba2``.

ssd_triton: the chunked SSD scan, forward and backward (``ssd_chunked_triton``);
state_update: one decode step (``ssd_step_triton``); conv: causal depthwise conv1d + SiLU
(``causal_conv1d_silu``); norm: gated RMSNorm (``rmsnorm_gated``). Import these modules
only where Triton kernels will run (CUDA, or CPU under TRITON_INTERPRET=1, which Triton
reads when the kernels are defined).
"""

# What this process's autotune searches cost (arch.kernels.tuning): searches run, their
# seconds, and choices read from a cache another process or run stored. Here, not in
# tuning, so that the trainer reads it without importing Triton.
PAID = {"autotunes": 0, "autotune_s": 0.0, "autotune_cache_hits": 0}
