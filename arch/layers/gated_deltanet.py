"""Gated DeltaNet (``G``): the gated delta rule of Yang, Kautz and Hatamizadeh (2024),
shaped as flash-linear-attention's ``GatedDeltaNet`` layer.

Per head, with L2-normalised key k_t and query q_t (scaled by 1 / sqrt(d_k)), a decay
alpha_t = exp(g_t) in (0, 1] and a write strength beta_t in (0, 1), the state S (d_k x d_v)
follows
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t
(the paper's S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, transposed to
fla's layout). The layer around it: one projection to q, k, v, the output gate, g and
beta; a causal depthwise conv + SiLU over q, k and v; g = -exp(A_log) softplus(a + dt_bias)
and beta = sigmoid(b); a per-head RMSNorm of o times SiLU(gate); the output projection.

``gated_delta_rule_recurrent`` is the rule step by step, the reference;
``gated_delta_rule_chunked`` computes the same in chunks (the WY form of fla's kernels),
parallel within each chunk; with gdn_impl "fla", fla-core's ``chunk_gated_delta_rule``.
"""

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arch.layers.common import conv_step, keep_conv_inputs, store
from arch.registry import LayerType, register

if TYPE_CHECKING:
    from arch.config import ModelConfig

GATED_DELTANET = "G"
CHUNK = 64  # fla's kernels' chunk; the FLOP count assumes it


def gated_delta_rule_step(
    state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor
) -> Tensor:
    """One step. q, k (batch, heads, d_k), already normalised and scaled; v (batch, heads,
    d_v); g, beta (batch, heads). Updates state (batch, heads, d_k, d_v) in place; returns
    o (batch, heads, d_v) in the state's dtype."""
    dtype = state.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    state.mul_(g.to(dtype).exp()[..., None, None])
    # what the decayed state recalls for k, replaced by v in proportion beta
    delta = beta.to(dtype)[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhkv,bhk->bhv", state, q)


def gated_delta_rule_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The rule one position at a time. q, k (batch, seqlen, heads, d_k); v (batch,
    seqlen, heads, d_v); g, beta (batch, seqlen, heads). Returns o (batch, seqlen, heads,
    d_v) and the final state (batch, heads, d_k, d_v), both fp32."""
    batch, seqlen, heads, d_k = k.shape
    state = torch.zeros(batch, heads, d_k, v.shape[-1], device=v.device, dtype=torch.float32)
    if initial_state is not None:
        state.copy_(initial_state)
    o = [gated_delta_rule_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
         for t in range(seqlen)]  # fmt: skip
    return torch.stack(o, dim=1), state


def gated_delta_rule_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    initial_state: Tensor | None = None, chunk_size: int = CHUNK,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The rule in chunks, as ``gated_delta_rule_recurrent`` (same arguments and results).

    Within a chunk entered with state S_0, let G_i = exp(g_1 + ... + g_i). The values each
    step writes, u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i), solve a unit lower-triangular
    system, (I + A) U = diag(beta) (V - diag(G) K S_0) with A_ij = beta_i G_i / G_j k_i.k_j
    (j < i); then o_i = G_i S_0^T q_i + sum_{j <= i} G_i / G_j (q_i.k_j) u_j and the chunk
    leaves S_0 G_last + sum_j G_last / G_j k_j u_j^T. All but the carry of S across
    chunks runs for every chunk at once.
    """
    batch, seqlen, heads, d_k = k.shape
    n_chunks = max(1, math.ceil(seqlen / chunk_size))
    pad = n_chunks * chunk_size - seqlen

    def chunked(x: Tensor) -> Tensor:  # (b, L, h, ...) -> (b, h, chunks, chunk, ...), fp32
        # Padding writes nothing (beta 0) and decays nothing (g 0): the state passes through.
        x = F.pad(x.float(), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.transpose(1, 2).unflatten(2, (n_chunks, chunk_size))

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    log_decay = g.cumsum(-1)  # log G_i within each chunk
    # G_i / G_j for j <= i, masked before the exp so that nothing overflows
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    ratios = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -math.inf)
    ratios = ratios.exp()
    strict = ratios.tril(-1) * beta[..., :, None] * (k @ k.transpose(-1, -2))
    unit_lower = strict + torch.eye(chunk_size, device=q.device)
    solve = lambda rhs: torch.linalg.solve_triangular(  # noqa: E731
        unit_lower, rhs, upper=False, unitriangular=True
    )
    # U = new_values - new_keys @ S_0
    new_values = solve(beta[..., None] * v)
    new_keys = solve((beta * log_decay.exp())[..., None] * k)
    scores = ratios * (q @ k.transpose(-1, -2))
    q_decayed = log_decay.exp()[..., None] * q
    k_to_end = (log_decay[..., -1:] - log_decay).exp()[..., None] * k

    state = torch.zeros(batch, heads, d_k, v.shape[-1], device=v.device, dtype=torch.float32)
    if initial_state is not None:
        state.copy_(initial_state)
    out = []
    for c in range(n_chunks):
        u = new_values[:, :, c] - new_keys[:, :, c] @ state
        out.append(q_decayed[:, :, c] @ state + scores[:, :, c] @ u)
        state = log_decay[:, :, c, -1, None, None].exp() * state + k_to_end[:, :, c].mT @ u
    o = torch.stack(out, dim=2).flatten(2, 3)[:, :, :seqlen]
    return o.transpose(1, 2), state


def _fla_chunked(q, k, v, g, beta, initial_state=None):
    """fla-core's Triton kernels for the same rule (CUDA only), imported when used: the
    package is an optional extra."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, final = chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, initial_state=initial_state,
                                      output_final_state=True)  # fmt: skip
    return o, final.float()


class GatedDeltaNet(nn.Module):
    """forward(u, cache): cache None trains; an empty dict prefills it with the conv inputs
    ("conv", (batch, conv_dim, d_conv)) and the state ("ssm", (batch, heads, d_k, d_v),
    fp32); a filled dict decodes one token (u of seqlen 1) in place; a longer u is a new
    prompt. ``allocate_cache`` preallocates both (a static cache)."""

    def __init__(
        self,
        d_model: int,
        head_dim: int = 64,
        expand: int = 2,
        d_conv: int = 4,
        impl: str = "torch",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1, 16),
    ) -> None:
        super().__init__()
        self.impl, self.d_conv = impl, d_conv
        self.nheads = d_model // head_dim
        self.d_k, self.d_v = head_dim, expand * head_dim
        self.key_dim, self.value_dim = self.nheads * self.d_k, self.nheads * self.d_v
        self.conv_dim = 2 * self.key_dim + self.value_dim
        # in_proj's output: [q, k, v | gate | a, b]
        self.in_proj = nn.Linear(d_model, self.conv_dim + self.value_dim + 2 * self.nheads,
                                 bias=False)  # fmt: skip
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=False)  # fmt: skip
        # The decay's rate starts as Mamba-2's: dt log-uniform in [dt_min, dt_max] (dt_bias
        # holds its inverse softplus), A uniform in A_init_range.
        log_dt = torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = log_dt.exp().clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_init_range).log())
        for p in (self.dt_bias, self.A_log):
            p._no_weight_decay = True
        self.norm_weight = nn.Parameter(torch.ones(self.d_v))  # shared by the heads, as fla's
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def _rule_inputs(self, qkv: Tensor, ab: Tensor) -> tuple[Tensor, ...]:
        """q, k (normalised, q scaled), v split into heads; g and beta. Any leading dims."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = F.normalize(q.unflatten(-1, (self.nheads, self.d_k)).float(), dim=-1)
        k = F.normalize(k.unflatten(-1, (self.nheads, self.d_k)).float(), dim=-1)
        a, b = ab.float().chunk(2, dim=-1)
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        return q * self.d_k**-0.5, k, v.unflatten(-1, (self.nheads, self.d_v)), g, b.sigmoid()

    def _output(self, o: Tensor, gate: Tensor) -> Tensor:
        """RMSNorm of each head's output times SiLU(gate), then the output projection."""
        normed = F.rms_norm(o.float(), (self.d_v,), self.norm_weight.float(), eps=1e-5)
        gated = normed * F.silu(gate.unflatten(-1, (self.nheads, self.d_v)).float())
        return self.out_proj(gated.flatten(-2).to(gate.dtype))

    def forward(self, u: Tensor, cache: dict | None = None) -> Tensor:
        if cache and u.shape[1] == 1:
            return self._step(u, cache)
        seqlen = u.shape[1]
        qkv, gate, ab = self.in_proj(u).split([self.conv_dim, self.value_dim, 2 * self.nheads], -1)
        if cache is not None:
            keep_conv_inputs(cache, qkv.transpose(1, 2), self.d_conv)
        qkv = F.silu(self.conv1d(qkv.transpose(1, 2))[..., :seqlen]).transpose(1, 2)
        rule = _fla_chunked if self.impl == "fla" and u.is_cuda else gated_delta_rule_chunked
        o, final = rule(*self._rule_inputs(qkv, ab))
        if cache is not None:
            store(cache, "ssm", final)
        return self._output(o, gate)

    def _step(self, u: Tensor, cache: dict) -> Tensor:
        qkv, gate, ab = self.in_proj(u[:, 0]).split(
            [self.conv_dim, self.value_dim, 2 * self.nheads], -1
        )
        qkv = F.silu(conv_step(cache["conv"], qkv, self.conv1d))
        o = gated_delta_rule_step(cache["ssm"], *self._rule_inputs(qkv, ab))
        return self._output(o, gate)[:, None]

    def allocate_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> dict:
        return {
            "conv": torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype),
            "ssm": torch.zeros(batch, self.nheads, self.d_k, self.d_v, device=device),
        }


def _widths(c: "ModelConfig") -> tuple[int, int, int, int]:
    """(heads H, key width K = H d_k, value width V = H d_v, conv channels 2K + V)."""
    heads = c.d_model // c.gdn_head_dim
    key, value = heads * c.gdn_head_dim, heads * c.expand * c.gdn_head_dim
    return heads, key, value, 2 * key + value


def _matrix_params(c: "ModelConfig") -> int:
    heads, _, value, conv = _widths(c)
    return c.d_model * (conv + value + 2 * heads) + value * c.d_model  # in_proj, out_proj


def _other_params(c: "ModelConfig") -> int:
    heads, _, value, conv = _widths(c)
    return conv * c.d_conv + 2 * heads + value // heads  # conv, A_log and dt_bias, norm


def _sequence_flops(c: "ModelConfig", seq_len: int) -> int:
    """Per token and head, at chunk Q: the chunk's K K^T and Q K^T rows (2 x 2 Q d_k),
    solving for the written values and keys (2 x Q (d_v + d_k)), their scores (2 Q d_v),
    and against the entering state: S^T q, k^T S, the state's update (3 x 2 d_k d_v); and
    the conv. The triangular solve is counted as its matrix products."""
    heads, _, _, conv = _widths(c)
    d_k, d_v = c.gdn_head_dim, c.expand * c.gdn_head_dim
    chunk = min(CHUNK, seq_len)
    per_head = 4 * chunk * d_k + 2 * chunk * (d_v + d_k) + 2 * chunk * d_v + 6 * d_k * d_v
    return heads * per_head + 2 * c.d_conv * conv


def _decode_flops(c: "ModelConfig", context: int) -> int:
    """Per head: decay the state (d_k d_v), recall k^T S, add k delta^T and read S^T q
    (2 d_k d_v each); and the conv."""
    heads, _, _, conv = _widths(c)
    return 7 * heads * c.gdn_head_dim * c.expand * c.gdn_head_dim + 2 * c.d_conv * conv


def _check(c: "ModelConfig") -> None:
    if c.d_model % c.gdn_head_dim:
        raise ValueError(f"d_model {c.d_model} is not divisible by gdn_head_dim {c.gdn_head_dim}")


register(
    LayerType(
        symbol=GATED_DELTANET,
        name="gated_deltanet",
        label="GatedDeltaNet",
        build=lambda c: GatedDeltaNet(
            c.d_model, c.gdn_head_dim, c.expand, c.d_conv, c.gdn_impl
        ),  # fmt: skip
        matrix_params=_matrix_params,
        other_params=_other_params,
        sequence_flops=_sequence_flops,
        decode_flops=_decode_flops,
        state_values=lambda c: _widths(c)[0] * c.gdn_head_dim * c.expand * c.gdn_head_dim,
        conv_values=lambda c: _widths(c)[3] * c.d_conv,
        fused_launches=6,  # as Mamba-2's: norm, projection, conv, state update, gated norm, out
        check=_check,
        width_multiple=lambda get: get("gdn_head_dim"),
        recurrent=True,
    )
)
