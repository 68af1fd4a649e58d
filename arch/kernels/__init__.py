"""Fused Triton kernels for the Mamba-2 mixer; the PyTorch reference is ``arch.ssd`` and
``arch.layers.mamba2``.

ssd_triton: the chunked SSD scan, forward and backward (``ssd_chunked_triton``);
state_update: one decode step (``ssd_step_triton``); conv: causal depthwise conv1d + SiLU
(``causal_conv1d_silu``); norm: gated RMSNorm (``rmsnorm_gated``). Import these modules
only where Triton kernels will run (CUDA, or CPU under TRITON_INTERPRET=1, which Triton
reads when the kernels are defined).
"""
