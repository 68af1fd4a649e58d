"""Mamba-2's chunked SSD scan as Triton kernels, forward and backward.

Same maths and argument conventions as ``arch.ssd.ssd_chunked`` (see there). Per head,
with a_i the running sum of dt*A inside a chunk (a "log decay", never increasing):

    forward   dt (bias, softplus) and a, per chunk                 _dt_cumsum_fwd
              C_i.B_s for every pair in a chunk, per group          _chunk_cb
              each chunk's own state                                _chunk_outer
              states passed across chunks (sequential)              _state_passing_fwd
              outputs: inside the chunk + entering state, D, z     _chunk_scan_fwd
    backward  the gate: dy and dz                                   _gate_bwd
              gradients of the entering, then of the own states     _chunk_outer,
                                                                    _state_passing_bwd
              dx, dt (but for the decays), dD                       _chunk_scan_bwd_dx
              d(C_i.B_s) per group, then dB, dC from it             _chunk_scan_bwd_dcb,
                                                                    _chunk_cb_bwd
              dC through entering states, dB through own states     _state_grad
              dt, dA and dt_bias through the decays                 _dt_cumsum_bwd
    The gradient of the decays is never a difference of near-equal sums, as bf16's rounding
    of the products behind them does not cancel (dA then erred 7-60x, dt_bias 2-12x more
    than mamba_ssm's): inside a chunk it is taken pair by pair, (dy_i.x_s dt_s) C_i.B_s
    exp(a_i - a_s) in fp32 for s <= i; through a chunk's own state, as the gradient of
    a_end - a_s, summed over the steps after s.

Inputs are read in place (bf16 or fp32) with their own batch/time strides; matmuls run on
tensor cores in the input dtype with fp32 accumulation; everything carried between
kernels (decays, chunks' own states, gradients of states) is fp32, but for the states
entering the chunks, which are kept in the input dtype. fp32 inputs use IEEE fp32 dots, so
under TRITON_INTERPRET=1 they match the reference to rounding. Offsets are computed in
int64, so tensors may pass 2**31 elements. Gradients of B, C, D and of the decays are
summed with fp32 atomics: bitwise reproducible only up to the order of those sums.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from arch.kernels.tuning import INTERPRET, autotune, choices

# Triton 3.9's interpreter gets bf16 wrong: tl.dot of bf16 operands (results near 1e10
# seen on N(0, 1) inputs), and fp32 -> bf16 casts truncate where the GPU rounds to
# nearest even. There, _dot emulates the tensor cores instead (see _operand).
_EMULATE_DOT = tl.constexpr(INTERPRET)


def _tune(configs: list[triton.Config], small: dict, key=("Q", "P", "N"), **kwargs):
    """Autotune on the GPU over ``configs`` (see arch.kernels.tuning)."""
    configs = choices(configs, triton.Config(small, num_warps=1))
    # The choice is kept on disk with the compiled kernels, so only the first run to use
    # a cache folder (a study's, see runners.compiling) pays for the search.
    return autotune(configs, key=list(key), **kwargs)


def _configs(blocks: list[dict], stages=(2, 3)) -> list[triton.Config]:
    """4 and 8 warps per block size; 128-row blocks only with 8, as 4 spill registers
    (seen compiling for sm_90)."""
    return [triton.Config(b, num_warps=w, num_stages=s) for b in blocks
            for w in ((8,) if b.get("BM") == 128 else (4, 8)) for s in stages]  # fmt: skip


# Block sizes to try on Hopper (chunks of 64 to 256 positions, headdim 64, d_state 128).
# The row kernels' best configs on an H100 used the most stages offered (3): 4 is offered.
_ROWS = _configs([{"BM": 64, "BK": 64}, {"BM": 64, "BK": 32}, {"BM": 128, "BK": 64},
                  {"BM": 128, "BK": 32}], stages=(2, 3, 4))  # fmt: skip
_OUTER = _configs([{"BP": 64, "BN": 64, "BK": 64}, {"BP": 64, "BN": 128, "BK": 64},
                   {"BP": 32, "BN": 64, "BK": 64}, {"BP": 64, "BN": 64, "BK": 32}])  # fmt: skip
_PAIRS = _configs([{"BM": 64, "BN": 64, "BK": 64}, {"BM": 128, "BN": 64, "BK": 64},
                   {"BM": 64, "BN": 128, "BK": 64}, {"BM": 64, "BN": 64, "BK": 32}])  # fmt: skip
_SPLIT_TILES = _configs([{"BM": 64, "BK": 64, "HEADS": h} for h in (4, 8, 16, 32, 64)]
                        + [{"BM": 128, "BK": 64, "HEADS": 8}], stages=(2,))  # fmt: skip
_SPLIT_ROWS = _configs(
    [{"BM": bm, "HEADS": h} for bm, h in ((64, 4), (64, 8), (64, 16), (128, 8), (32, 8))],
    stages=(2,),
)


@triton.jit
def _operand(v, DTYPE: tl.constexpr):
    """Under the interpreter: v rounded to DTYPE as the GPU's cast does (to nearest even,
    by bits: the interpreter's cast truncates), held in fp32."""
    if DTYPE == tl.bfloat16 and v.dtype == tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """a @ b with both operands cast to DTYPE (PREC "ieee" for fp32), fp32 accumulation.
    Under the interpreter, the same products: operands rounded to DTYPE, multiplied and
    summed in fp32 (exact products, as tensor cores form them; only the order of the
    sums may differ)."""
    if _EMULATE_DOT:
        out = tl.dot(_operand(a, DTYPE), _operand(b, DTYPE), input_precision="ieee")
    else:
        out = tl.dot(a.to(DTYPE), b.to(DTYPE), input_precision=PREC, out_dtype=tl.float32)
    return out


@triton.jit
def _softplus(v):
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def _tile_first(TILES):
    """A one-dimensional grid of TILES tiles of each (batch, chunk, head or group, ...),
    the tiles fastest: (that rest's index, the tile). The tiles of one chunk and head run
    side by side, so the states and rows they all read come from L2, not DRAM again."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // TILES, (pid % TILES).to(tl.int32)


@triton.jit
def _split(H, G, NC, HEADS: tl.constexpr, TILES):
    """Grid (TILES * batch * chunks * groups * splits,), see _tile_first: batch, chunk,
    group, the range of heads of that group this program sums over (many heads share a
    group's B and C), and the tile."""
    per_group = H // G
    splits = tl.cdiv(per_group, HEADS)
    rest, tile = _tile_first(TILES)
    bc, gs = rest // (G * splits), rest % (G * splits)
    g = gs // splits
    first = g * per_group + (gs % splits) * HEADS
    last = tl.minimum(first + HEADS, (g + 1) * per_group)
    return bc // NC, bc % NC, g, first, last, tile


# ---------------------------------------------------------------------------------------
# dt and the log decays a, per chunk: (b, h, chunks, Q) fp32.


@triton.jit
def _dt_cumsum_fwd(
    dt_ptr, bias_ptr, A_ptr, dtp_ptr, a_ptr,
    L, H, NC, Q, s_dt_b, s_dt_t,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BH: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    b, c, hb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    h = hb * BH + tl.arange(0, BH)
    i = tl.arange(0, BQ)
    t = c * Q + i
    valid = (h[:, None] < H) & (i[None, :] < Q) & (t[None, :] < L)
    dt = tl.load(dt_ptr + b * s_dt_b + t[None, :] * s_dt_t + h[:, None], mask=valid).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h, mask=h < H).to(tl.float32)[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(valid, dt, 0.0)  # the padded tail neither decays nor adds input
    A = tl.load(A_ptr + h, mask=h < H).to(tl.float32)
    a = tl.cumsum(dt * A[:, None], axis=1)
    out = ((b * H + h[:, None]) * NC + c) * Q + i[None, :]
    keep = (h[:, None] < H) & (i[None, :] < Q)
    tl.store(dtp_ptr + out, dt, mask=keep)
    tl.store(a_ptr + out, a, mask=keep)


@triton.jit
def _dt_cumsum_bwd(
    dt_ptr, bias_ptr, A_ptr, dtp_ptr, ddt_ptr, da_own_ptr, da_cb_ptr, da_off_ptr, da_end_ptr,
    ddt_out_ptr, dA_part_ptr, dbias_part_ptr,
    L, H, NC, Q, s_dt_b, s_dt_t, s_ddt_b, s_ddt_t,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BH: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    """Sums the gradients of a, takes them back through the cumsum, dt*A and softplus."""
    b, c, hb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    h = hb * BH + tl.arange(0, BH)
    i = tl.arange(0, BQ)
    t = c * Q + i
    keep = (h[:, None] < H) & (i[None, :] < Q)
    valid = keep & (t[None, :] < L)
    buf = ((b * H + h[:, None]) * NC + c) * Q + i[None, :]
    da = tl.load(da_cb_ptr + buf, mask=keep, other=0.0)
    da += tl.load(da_off_ptr + buf, mask=keep, other=0.0)
    end = tl.load(da_end_ptr + (b * H + h) * NC + c, mask=h < H, other=0.0)
    da += tl.where(i[None, :] == Q - 1, end[:, None], 0.0)
    ddA = tl.cumsum(da, axis=1, reverse=True)  # a_i sums dA over steps <= i
    # a_end - a_s sums dA over steps after s: summed directly, not as the end's total less
    # those after it (a difference of near-equal sums, where bf16 products round apart).
    own = tl.load(da_own_ptr + buf, mask=keep, other=0.0)
    ddA += tl.cumsum(own, axis=1) - own
    dtp = tl.load(dtp_ptr + buf, mask=keep, other=0.0)
    A = tl.load(A_ptr + h, mask=h < H, other=0.0)
    tl.store(dA_part_ptr + (b * NC + c) * H + h, tl.sum(ddA * dtp, axis=1), mask=h < H)
    ddt = tl.load(ddt_ptr + buf, mask=keep, other=0.0) + ddA * A[:, None]
    if SOFTPLUS:
        raw = tl.load(dt_ptr + b * s_dt_b + t[None, :] * s_dt_t + h[:, None], mask=valid)
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + h, mask=h < H).to(tl.float32)[:, None]
        ddt *= tl.sigmoid(raw)
    ddt = tl.where(valid, ddt, 0.0)
    tl.store(ddt_out_ptr + b * s_ddt_b + t[None, :] * s_ddt_t + h[:, None], ddt, mask=valid)
    tl.store(dbias_part_ptr + (b * NC + c) * H + h, tl.sum(ddt, axis=1), mask=h < H)


# ---------------------------------------------------------------------------------------
# out[p, n] = sum_i scale_i U_i[p] V_i[n] over one chunk, per head:
#  a chunk's own state (U = x, V = B, scale = exp(a_end - a_i) dt_i), or in backward the
#  gradient of its entering state from its outputs (U = dy, V = C, scale = exp(a_i)).


@_tune(_OUTER, {"BP": 16, "BN": 16, "BK": 16}, key=("Q", "P", "N", "STATE"))
@triton.jit
def _chunk_outer(
    u_ptr, v_ptr, dtp_ptr, a_ptr, out_ptr,
    L, H, G, NC, Q, P, N, s_u_b, s_u_t, s_v_b, s_v_t,
    STATE: tl.constexpr, PREC: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    bch, tile = _tile_first(tl.cdiv(P, BP) * tl.cdiv(N, BN))
    b, c, h = bch // (NC * H), (bch // H) % NC, bch % H
    g = h // (H // G)
    p = (tile // tl.cdiv(N, BN)) * BP + tl.arange(0, BP)
    n = (tile % tl.cdiv(N, BN)) * BN + tl.arange(0, BN)
    buf = ((b * H + h) * NC + c) * Q
    a_end = tl.load(a_ptr + buf + Q - 1)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for i0 in range(0, Q, BK):
        i = i0 + tl.arange(0, BK)
        t = c * Q + i
        ok = (i < Q) & (t < L)
        u = tl.load(u_ptr + b * s_u_b + t[None, :] * s_u_t + h * P + p[:, None],
                    mask=ok[None, :] & (p[:, None] < P), other=0.0)  # fmt: skip
        v = tl.load(v_ptr + b * s_v_b + t[:, None] * s_v_t + g * N + n[None, :],
                    mask=ok[:, None] & (n[None, :] < N), other=0.0)  # fmt: skip
        a = tl.load(a_ptr + buf + i, mask=i < Q, other=0.0)
        if STATE:
            scale = tl.exp(a_end - a) * tl.load(dtp_ptr + buf + i, mask=i < Q, other=0.0)
        else:
            scale = tl.exp(a)
        acc += _dot(u * scale[None, :], v, v.dtype, PREC)
    out = (((b * NC + c) * H + h) * P + p[:, None]) * N + n[None, :]
    tl.store(out_ptr + out, acc, mask=(p[:, None] < P) & (n[None, :] < N))


# ---------------------------------------------------------------------------------------
# C_i.B_s for the pairs of a chunk, per group: (b, chunks, g, Q, Q) fp32, zero above the
# diagonal (s > i), which no kernel reads unmasked. In a kernel rather than a torch matmul
# because that one needs fp32 copies of B and C (no bf16 x bf16 -> fp32 product on every
# backend) and runs off the tensor cores, at a cost growing with groups x seqlen: on an
# H100, 8 groups' forward took 1.6x one group's that way, 1.13x with these kernels.


@_tune(_PAIRS, {"BM": 16, "BN": 16, "BK": 16}, key=("Q", "N", "G"))  # G: work per launch
@triton.jit
def _chunk_cb(
    C_ptr, B_ptr, cb_ptr, L, G, NC, Q, N, s_C_b, s_C_t, s_B_b, s_B_t,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    bcg = tl.program_id(0).to(tl.int64)
    b, c, g = bcg // (NC * G), (bcg // G) % NC, bcg % G
    i0, s0 = tl.program_id(1) * BM, tl.program_id(2) * BN
    i, s = i0 + tl.arange(0, BM), s0 + tl.arange(0, BN)
    t_i, t_s = c * Q + i, c * Q + s
    ok_i, ok_s = (i < Q) & (t_i < L), (s < Q) & (t_s < L)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, tl.where(s0 < i0 + BM, N, 0), BK):  # tiles above the diagonal: 0
        k = k0 + tl.arange(0, BK)
        Ci = tl.load(C_ptr + b * s_C_b + t_i[:, None] * s_C_t + g * N + k[None, :],
                     mask=ok_i[:, None] & (k[None, :] < N), other=0.0)  # fmt: skip
        BsT = tl.load(B_ptr + b * s_B_b + t_s[None, :] * s_B_t + g * N + k[:, None],
                      mask=ok_s[None, :] & (k[:, None] < N), other=0.0)  # fmt: skip
        acc += _dot(Ci, BsT, Ci.dtype, PREC)
    acc = tl.where(s[None, :] <= i[:, None], acc, 0.0)
    out = bcg * Q * Q + i[:, None] * Q + s[None, :]
    tl.store(cb_ptr + out, acc, mask=(i[:, None] < Q) & (s[None, :] < Q))


# restore_value: out holds _state_grad's sums, and the search runs every config on it.
@_tune(_PAIRS, {"BM": 16, "BN": 16, "BK": 16}, key=("Q", "N", "G", "TRANS"),
       restore_value=["out_ptr"])  # fmt: skip
@triton.jit
def _chunk_cb_bwd(
    dcb_ptr, v_ptr, out_ptr, L, G, NC, Q, N, s_v_b, s_v_t,
    TRANS: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Adds to out (b, L, g, N) fp32, for a block of BM positions r of a chunk, the sum
    over the chunk's positions k of dcb[r, k] v_k (dC, with v = B) or, with TRANS,
    dcb[k, r] v_k (dB, with v = C), dcb rounded to v's dtype as mamba_ssm does. dcb is
    zero above the diagonal, so the sum runs over k <= r, or k >= r."""
    bcg = tl.program_id(0).to(tl.int64)
    b, c, g = bcg // (NC * G), (bcg // G) % NC, bcg % G
    r0 = tl.program_id(1) * BM
    r, n = r0 + tl.arange(0, BM), tl.program_id(2) * BN + tl.arange(0, BN)
    t_r = c * Q + r
    ok_r = (r < Q) & (t_r < L)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    start = (r0 // BK) * BK if TRANS else 0
    stop = Q if TRANS else tl.minimum(r0 + BM, Q)
    for k0 in range(start, stop, BK):
        k = k0 + tl.arange(0, BK)
        if TRANS:
            m = tl.load(dcb_ptr + bcg * Q * Q + k[None, :] * Q + r[:, None],
                        mask=(r[:, None] < Q) & (k[None, :] < Q), other=0.0)  # fmt: skip
        else:
            m = tl.load(dcb_ptr + bcg * Q * Q + r[:, None] * Q + k[None, :],
                        mask=(r[:, None] < Q) & (k[None, :] < Q), other=0.0)  # fmt: skip
        t_k = c * Q + k
        v = tl.load(v_ptr + b * s_v_b + t_k[:, None] * s_v_t + g * N + n[None, :],
                    mask=((k < Q) & (t_k < L))[:, None] & (n[None, :] < N), other=0.0)  # fmt: skip
        acc += _dot(m, v, v.dtype, PREC)
    o = ((b * L + t_r[:, None]) * G + g) * N + n[None, :]
    io = ok_r[:, None] & (n[None, :] < N)
    tl.store(out_ptr + o, tl.load(out_ptr + o, mask=io, other=0.0) + acc, mask=io)


# ---------------------------------------------------------------------------------------
# Across chunks: from the chunks' own states (fp32), the state entering each chunk, kept in
# the input dtype as mamba_ssm keeps it: its readers cast it so for their tensor-core
# products anyway, and half the bytes shortened the forward (bench/RESULTS.md).
# The loop over chunks is sequential and bound by memory latency, so each iteration loads
# the next chunk's operands before it stores: the loads are in flight meanwhile.

_PASSING = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in
            ((1024, 4), (1024, 8), (512, 4), (2048, 8), (256, 2))]  # fmt: skip


@_tune(_PASSING, {"BLOCK": 16}, key=("NC", "PN"))
@triton.jit
def _state_passing_fwd(
    own_ptr, states_ptr, a_ptr, init_ptr, final_ptr, H, NC, Q, PN,
    HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < PN
    if HAS_INIT:
        s = tl.load(init_ptr + bh * PN + i, mask=ok).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    own = tl.load(own_ptr + (b * NC * H + h) * PN + i, mask=ok)
    decay = tl.exp(tl.load(a_ptr + bh * NC * Q + Q - 1))
    for c in range(NC):
        ahead = tl.minimum(c + 1, NC - 1)  # the last chunk loads itself again, unused
        next_own = tl.load(own_ptr + ((b * NC + ahead) * H + h) * PN + i, mask=ok)
        next_decay = tl.exp(tl.load(a_ptr + (bh * NC + ahead) * Q + Q - 1))
        entering = _operand(s, states_ptr.dtype.element_ty) if _EMULATE_DOT else s
        tl.store(states_ptr + ((b * NC + c) * H + h) * PN + i, entering, mask=ok)
        s = decay * s + own
        own, decay = next_own, next_decay
    tl.store(final_ptr + bh * PN + i, s, mask=ok)


@_tune(_PASSING, {"BLOCK": 16}, key=("NC", "PN"), restore_value=["dstates_ptr", "da_end_ptr"])
@triton.jit
def _state_passing_bwd(
    dstates_ptr, states_ptr, dfinal_ptr, a_ptr, dinit_ptr, da_end_ptr,
    H, NC, Q, PN, HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dstates[k] holds d(loss)/d(entering state k) from chunk k's outputs; it leaves with
    the gradient of chunk k's own state. Also adds to da_end[k] (zeroed) the entering
    state's share of d(loss)/d(a_end of chunk k) (the own state's: _dt_cumsum_bwd)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < PN
    if HAS_DFINAL:
        ds = tl.load(dfinal_ptr + bh * PN + i, mask=ok, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros((BLOCK,), dtype=tl.float32)
    last = ((b * NC + NC - 1) * H + h) * PN + i
    entering = tl.load(states_ptr + last, mask=ok, other=0.0).to(tl.float32)
    direct = tl.load(dstates_ptr + last, mask=ok, other=0.0)
    decay = tl.exp(tl.load(a_ptr + (bh * NC + NC - 1) * Q + Q - 1))
    for k in range(NC - 1, -1, -1):
        # the state after chunk k is exp(a_end) entering_k + own_k
        ahead = tl.maximum(k - 1, 0)  # chunk 0 loads itself again, unused
        at_ahead = ((b * NC + ahead) * H + h) * PN + i
        next_entering = tl.load(states_ptr + at_ahead, mask=ok, other=0.0).to(tl.float32)
        next_direct = tl.load(dstates_ptr + at_ahead, mask=ok, other=0.0)
        next_decay = tl.exp(tl.load(a_ptr + (bh * NC + ahead) * Q + Q - 1))
        tl.atomic_add(da_end_ptr + bh * NC + k, decay * tl.sum(ds * entering))
        tl.store(dstates_ptr + ((b * NC + k) * H + h) * PN + i, ds, mask=ok)
        ds = direct + decay * ds
        entering, direct, decay = next_entering, next_direct, next_decay
    tl.store(dinit_ptr + bh * PN + i, ds, mask=ok)


# ---------------------------------------------------------------------------------------
# Outputs, per head and block of BM positions of a chunk.


@_tune(_ROWS, {"BM": 16, "BK": 16})
@triton.jit
def _chunk_scan_fwd(
    x_ptr, z_ptr, C_ptr, cb_ptr, dtp_ptr, a_ptr, states_ptr, D_ptr, out_ptr, ypre_ptr,
    L, H, G, NC, Q, P, N, s_x_b, s_x_t, s_z_b, s_z_t, s_C_b, s_C_t, s_o_b, s_o_t,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    bch, block = _tile_first(tl.cdiv(Q, BM))
    b, c, h = bch // (NC * H), (bch // H) % NC, bch % H
    g = h // (H // G)
    m0 = block * BM
    i = m0 + tl.arange(0, BM)
    t = c * Q + i
    ok = (i < Q) & (t < L)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    buf = ((b * H + h) * NC + c) * Q
    a_i = tl.load(a_ptr + buf + i, mask=i < Q, other=0.0)

    # The entering state's share: exp(a_i) C_i . state.
    Ci = tl.load(C_ptr + b * s_C_b + t[:, None] * s_C_t + g * N + n[None, :],
                 mask=ok[:, None] & (n[None, :] < N), other=0.0)  # fmt: skip
    sT = tl.load(states_ptr + (((b * NC + c) * H + h) * P + p[None, :]) * N + n[:, None],
                 mask=(p[None, :] < P) & (n[:, None] < N), other=0.0)  # fmt: skip
    acc = _dot(Ci, sT, Ci.dtype, PREC) * tl.exp(a_i)[:, None]

    # Inside the chunk: sum over s <= i of C_i.B_s exp(a_i - a_s) dt_s x_s.
    cb_base = cb_ptr + ((b * NC + c) * G + g) * Q * Q
    for s0 in range(0, tl.minimum(m0 + BM, Q), BK):
        s = s0 + tl.arange(0, BK)
        causal = (s[None, :] <= i[:, None]) & (s[None, :] < Q)
        # Unmasked within the chunk (vector loads): the decay is zero above the diagonal.
        cb = tl.load(cb_base + i[:, None] * Q + s[None, :],
                     mask=(i[:, None] < Q) & (s[None, :] < Q), other=0.0)  # fmt: skip
        a_s = tl.load(a_ptr + buf + s, mask=s < Q, other=0.0)
        dt_s = tl.load(dtp_ptr + buf + s, mask=s < Q, other=0.0)
        decay = tl.exp(tl.where(causal, a_i[:, None] - a_s[None, :], float("-inf")))
        ts = c * Q + s
        xs = tl.load(x_ptr + b * s_x_b + ts[:, None] * s_x_t + h * P + p[None, :],
                     mask=((s < Q) & (ts < L))[:, None] & (p[None, :] < P), other=0.0)  # fmt: skip
        acc += _dot(cb * decay * dt_s[None, :], xs, xs.dtype, PREC)

    io = ok[:, None] & (p[None, :] < P)
    if HAS_D:
        xi = tl.load(x_ptr + b * s_x_b + t[:, None] * s_x_t + h * P + p[None, :], mask=io,
                     other=0.0).to(tl.float32)  # fmt: skip
        if D_PER_P:
            acc += xi * tl.load(D_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)[None, :]
        else:
            acc += xi * tl.load(D_ptr + h).to(tl.float32)
    o = b * s_o_b + t[:, None] * s_o_t + h * P + p[None, :]
    if HAS_Z:
        tl.store(ypre_ptr + o, acc, mask=io)
        zi = tl.load(z_ptr + b * s_z_b + t[:, None] * s_z_t + h * P + p[None, :], mask=io,
                     other=0.0).to(tl.float32)  # fmt: skip
        acc *= zi * tl.sigmoid(zi)
    tl.store(out_ptr + o, acc, mask=io)


# ---------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _gate_bwd(
    dout_ptr, z_ptr, ypre_ptr, dy_ptr, dz_ptr, L, HP,
    s_d_b, s_d_t, s_z_b, s_z_t, s_y_b, s_y_t, s_dz_b, s_dz_t, BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """out = ypre * silu(z): the gradients of ypre and z."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BL + tl.arange(0, BL)
    j = tl.program_id(2) * BC + tl.arange(0, BC)
    m = (t[:, None] < L) & (j[None, :] < HP)
    do = tl.load(dout_ptr + b * s_d_b + t[:, None] * s_d_t + j[None, :], mask=m).to(tl.float32)
    z = tl.load(z_ptr + b * s_z_b + t[:, None] * s_z_t + j[None, :], mask=m).to(tl.float32)
    y = tl.load(ypre_ptr + b * s_y_b + t[:, None] * s_y_t + j[None, :], mask=m)
    sig = tl.sigmoid(z)
    tl.store(dy_ptr + b * s_y_b + t[:, None] * s_y_t + j[None, :], do * z * sig, mask=m)
    dz = do * y * sig * (1.0 + z * (1.0 - sig))
    tl.store(dz_ptr + b * s_dz_b + t[:, None] * s_dz_t + j[None, :], dz, mask=m)


@_tune(_ROWS, {"BM": 16, "BK": 16}, reset_to_zero=["dD_ptr"])
@triton.jit
def _chunk_scan_bwd_dx(
    x_ptr, dy_ptr, dout_ptr, z_ptr, B_ptr, cb_ptr, dtp_ptr, a_ptr, dstates_ptr, D_ptr,
    dx_ptr, ddt_ptr, da_ptr, dD_ptr,
    L, H, G, NC, Q, P, N, s_x_b, s_x_t, s_dy_b, s_dy_t, s_do_b, s_do_t, s_z_b, s_z_t,
    s_B_b, s_B_t, s_dx_b, s_dx_t,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Per head and block of source positions s: dx, ddt (all but the decay's share), the
    own state's d(loss)/d(a_end - a_s), and D's gradient summed over the block."""
    bch, block = _tile_first(tl.cdiv(Q, BM))
    b, c, h = bch // (NC * H), (bch // H) % NC, bch % H
    g = h // (H // G)
    m0 = block * BM
    s = m0 + tl.arange(0, BM)
    ts = c * Q + s
    ok = (s < Q) & (ts < L)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    buf = ((b * H + h) * NC + c) * Q
    a_s = tl.load(a_ptr + buf + s, mask=s < Q, other=0.0)
    dt_s = tl.load(dtp_ptr + buf + s, mask=s < Q, other=0.0)
    a_end = tl.load(a_ptr + buf + Q - 1)

    # Through the chunk's own state: exp(a_end - a_s) (B_s . dstate).
    Bs = tl.load(B_ptr + b * s_B_b + ts[:, None] * s_B_t + g * N + n[None, :],
                 mask=ok[:, None] & (n[None, :] < N), other=0.0)  # fmt: skip
    dsT = tl.load(dstates_ptr + (((b * NC + c) * H + h) * P + p[None, :]) * N + n[:, None],
                  mask=(p[None, :] < P) & (n[:, None] < N), other=0.0)  # fmt: skip
    acc = _dot(Bs, dsT, Bs.dtype, PREC) * tl.exp(a_end - a_s)[:, None]
    io = ok[:, None] & (p[None, :] < P)
    # x_s's input to the own state decays by exp(a_end - a_s): the gradient of a_end - a_s.
    # (Its share through later outputs comes from _chunk_scan_bwd_dcb, in fp32: bf16's
    # rounding of the products below would not cancel against dy_i.y_i there.)
    xs = tl.load(x_ptr + b * s_x_b + ts[:, None] * s_x_t + h * P + p[None, :], mask=io,
                 other=0.0).to(tl.float32)  # fmt: skip
    tl.store(da_ptr + buf + s, dt_s * tl.sum(acc * xs, axis=1), mask=s < Q)

    # Through later outputs of the chunk: sum over i >= s of C_i.B_s exp(a_i - a_s) dy_i.
    cb_base = cb_ptr + ((b * NC + c) * G + g) * Q * Q
    for i0 in range((m0 // BK) * BK, Q, BK):
        i = i0 + tl.arange(0, BK)
        causal = (i[None, :] >= s[:, None]) & (i[None, :] < Q)
        cbT = tl.load(cb_base + i[None, :] * Q + s[:, None],
                      mask=(s[:, None] < Q) & (i[None, :] < Q), other=0.0)  # fmt: skip
        a_i = tl.load(a_ptr + buf + i, mask=i < Q, other=0.0)
        decay = tl.exp(tl.where(causal, a_i[None, :] - a_s[:, None], float("-inf")))
        t_i = c * Q + i
        ok_i = (i < Q) & (t_i < L)
        dyi = tl.load(dy_ptr + b * s_dy_b + t_i[:, None] * s_dy_t + h * P + p[None, :],
                      mask=ok_i[:, None] & (p[None, :] < P), other=0.0)  # fmt: skip
        acc += _dot(cbT * decay, dyi, dyi.dtype, PREC)

    # read again, not held in registers through the loop: 16% faster on an H200
    xs = tl.load(x_ptr + b * s_x_b + ts[:, None] * s_x_t + h * P + p[None, :], mask=io,
                 other=0.0).to(tl.float32)  # fmt: skip
    tl.store(ddt_ptr + buf + s, tl.sum(acc * xs, axis=1), mask=s < Q)
    dx = acc * dt_s[:, None]
    if HAS_D:
        if HAS_Z:  # dy = dout silu(z) again, in fp32: dD sums it over many positions
            dys = tl.load(dout_ptr + b * s_do_b + ts[:, None] * s_do_t + h * P + p[None, :],
                          mask=io, other=0.0).to(tl.float32)  # fmt: skip
            zs = tl.load(z_ptr + b * s_z_b + ts[:, None] * s_z_t + h * P + p[None, :], mask=io,
                         other=0.0).to(tl.float32)  # fmt: skip
            dys *= zs * tl.sigmoid(zs)
        else:
            dys = tl.load(dy_ptr + b * s_dy_b + ts[:, None] * s_dy_t + h * P + p[None, :],
                          mask=io, other=0.0).to(tl.float32)  # fmt: skip
        if D_PER_P:
            dx += dys * tl.load(D_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)[None, :]
        else:
            dx += dys * tl.load(D_ptr + h).to(tl.float32)
        dD = tl.sum(dys * xs, axis=0)
        if D_PER_P:
            tl.atomic_add(dD_ptr + h * P + p, dD, mask=p < P, sem="relaxed")
        else:
            tl.atomic_add(dD_ptr + h, tl.sum(dD), sem="relaxed")
    tl.store(dx_ptr + b * s_dx_b + ts[:, None] * s_dx_t + h * P + p[None, :], dx, mask=io)


@_tune(_SPLIT_TILES, {"BM": 16, "BK": 16, "HEADS": 2}, reset_to_zero=["dcb_ptr", "da_ptr"])
@triton.jit
def _chunk_scan_bwd_dcb(
    x_ptr, dy_ptr, cb_ptr, dtp_ptr, a_ptr, dcb_ptr, da_ptr,
    L, H, G, NC, Q, P, N, s_x_b, s_x_t, s_dy_b, s_dy_t,
    PREC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
    HEADS: tl.constexpr,
):  # fmt: skip
    """d(loss)/d(C_i.B_s) for one tile of (i, s), summed over up to HEADS of the group's
    heads (added to dcb); and each head's share of d(loss)/da from inside the chunk: a_i
    raises the log decays of row i and lowers those of column i, so da_i gets the row sum
    of dcb * cb minus its column sum (the diagonal cancels exactly)."""
    b, c, g, first, last, tile = _split(H, G, NC, HEADS, tl.cdiv(Q, BM) * tl.cdiv(Q, BK))
    i0, s0 = (tile // tl.cdiv(Q, BK)) * BM, (tile % tl.cdiv(Q, BK)) * BK
    i, s = i0 + tl.arange(0, BM), s0 + tl.arange(0, BK)
    causal = (s[None, :] <= i[:, None]) & (i[:, None] < Q) & (s[None, :] < Q)
    t_i, t_s = c * Q + i, c * Q + s
    ok_i, ok_s = (i < Q) & (t_i < L), (s < Q) & (t_s < L)
    p = tl.arange(0, BP)
    cb_tile = ((b * NC + c) * G + g) * Q * Q + i[:, None] * Q + s[None, :]
    # Tiles above the diagonal are zero: they skip the heads and add nothing.
    below = s0 < i0 + BM
    in_tile = (i[:, None] < tl.where(below, Q, 0)) & (s[None, :] < Q)
    cb = tl.load(cb_ptr + cb_tile, mask=in_tile, other=0.0)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for h in range(first, tl.where(below, last, first)):
        buf = ((b * H + h) * NC + c) * Q
        dyi = tl.load(dy_ptr + b * s_dy_b + t_i[:, None] * s_dy_t + h * P + p[None, :],
                      mask=ok_i[:, None] & (p[None, :] < P), other=0.0)  # fmt: skip
        xsT = tl.load(x_ptr + b * s_x_b + t_s[None, :] * s_x_t + h * P + p[:, None],
                      mask=ok_s[None, :] & (p[:, None] < P), other=0.0)  # fmt: skip
        a_i = tl.load(a_ptr + buf + i, mask=i < Q, other=0.0)
        a_s = tl.load(a_ptr + buf + s, mask=s < Q, other=0.0)
        dt_s = tl.load(dtp_ptr + buf + s, mask=s < Q, other=0.0)
        decay = tl.exp(tl.where(causal, a_i[:, None] - a_s[None, :], float("-inf")))
        dcb = _dot(dyi, xsT, dyi.dtype, PREC) * decay * dt_s[None, :]
        acc += dcb
        pair = dcb * cb  # d(loss)/d(log decay of pair (i, s))
        tl.atomic_add(da_ptr + buf + i, tl.sum(pair, axis=1), mask=i < Q, sem="relaxed")
        tl.atomic_add(da_ptr + buf + s, -tl.sum(pair, axis=0), mask=s < Q, sem="relaxed")
    tl.atomic_add(dcb_ptr + cb_tile, acc, mask=in_tile, sem="relaxed")


@_tune(_SPLIT_ROWS, {"BM": 16, "HEADS": 2}, key=("Q", "P", "N", "ENTERING"),
       reset_to_zero=["out_ptr"])  # fmt: skip
@triton.jit
def _state_grad(
    u_ptr, v_ptr, m_ptr, dtp_ptr, a_ptr, out_ptr, da_ptr,
    L, H, G, NC, Q, P, N, s_u_b, s_u_t, s_v_b, s_v_t,
    ENTERING: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HEADS: tl.constexpr,
):  # fmt: skip
    """Per block of positions, summed over up to HEADS of a group's heads (added to out),
    the gradient of C through the entering state (u = dy, m = entering state, scale
    exp(a_i); also each head's dy_i.y_i share of d(loss)/da_i), or of B through the
    chunk's own state (u = x, m = its gradient, scale exp(a_end - a_i) dt_i)."""
    b, c, g, first, last, block = _split(H, G, NC, HEADS, tl.cdiv(Q, BM))
    i = block * BM + tl.arange(0, BM)
    t = c * Q + i
    ok = (i < Q) & (t < L)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if ENTERING:
        v = tl.load(v_ptr + b * s_v_b + t[:, None] * s_v_t + g * N + n[None, :],
                    mask=ok[:, None] & (n[None, :] < N), other=0.0).to(tl.float32)  # fmt: skip
    for h in range(first, last):
        buf = ((b * H + h) * NC + c) * Q
        u = tl.load(u_ptr + b * s_u_b + t[:, None] * s_u_t + h * P + p[None, :],
                    mask=ok[:, None] & (p[None, :] < P), other=0.0)  # fmt: skip
        m = tl.load(m_ptr + (((b * NC + c) * H + h) * P + p[:, None]) * N + n[None, :],
                    mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # fmt: skip
        a_i = tl.load(a_ptr + buf + i, mask=i < Q, other=0.0)
        if ENTERING:
            part = _dot(u, m, u.dtype, PREC) * tl.exp(a_i)[:, None]
            tl.store(da_ptr + buf + i, tl.sum(part * v, axis=1), mask=i < Q)
        else:
            scale = tl.exp(tl.load(a_ptr + buf + Q - 1) - a_i)
            scale *= tl.load(dtp_ptr + buf + i, mask=i < Q, other=0.0)
            part = _dot(u, m, u.dtype, PREC) * scale[:, None]
        acc += part
    tl.atomic_add(out_ptr + ((b * L + t[:, None]) * G + g) * N + n[None, :], acc,
                  mask=ok[:, None] & (n[None, :] < N), sem="relaxed")  # fmt: skip


# ---------------------------------------------------------------------------------------
# Host side.


def _packed(t: Tensor) -> Tensor:
    """Kernels take any batch/time strides but need the trailing dims packed."""
    inner = t.shape[2:]
    want = [1] if len(inner) == 1 else [inner[1], 1]
    return t if list(t.stride()[2:]) == want else t.contiguous()


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class _Shape:
    def __init__(self, x: Tensor, B: Tensor, Q: int) -> None:
        self.b, self.L, self.H, self.P = x.shape
        self.G, self.N = B.shape[2:]
        self.Q, self.NC = Q, triton.cdiv(self.L, Q)
        self.BP, self.BN = _pow2(self.P), _pow2(self.N)
        self.prec = "ieee" if x.element_size() > 2 else "tf32"  # fp32: not TF32; 16-bit: unused
        self.BH = min(triton.next_power_of_2(self.H), 8)
        self.BQ = triton.next_power_of_2(Q)

    def split_grid(self, heads: int, tiles: int) -> tuple[int]:
        """The grid of kernels that sum over ``heads`` heads of a group (see _split)."""
        return (tiles * self.b * self.NC * self.G * triton.cdiv(self.H // self.G, heads),)

    def dims(self) -> tuple:
        return self.L, self.H, self.G, self.NC, self.Q, self.P, self.N


def _rows(s: _Shape):
    return lambda meta: (triton.cdiv(s.Q, meta["BM"]) * s.b * s.NC * s.H,)


def _chunk_outer_call(u: Tensor, v: Tensor, dtp: Tensor, a: Tensor, s: _Shape, state: bool):
    out = torch.empty(s.b, s.NC, s.H, s.P, s.N, device=u.device, dtype=torch.float32)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(s.P, meta["BP"]) * triton.cdiv(s.N, meta["BN"]) * s.b * s.NC * s.H,
    )
    _chunk_outer[grid](
        u, v, dtp, a, out, s.L, s.H, s.G, s.NC, s.Q, s.P, s.N,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), STATE=state, PREC=s.prec,
    )  # fmt: skip
    return out


def _forward(x, dt, A, B, C, s: _Shape, D, z, dt_bias, softplus, init):
    dev, f32 = x.device, torch.float32
    dtp = torch.empty(s.b, s.H, s.NC, s.Q, device=dev, dtype=f32)
    a = torch.empty_like(dtp)
    _dt_cumsum_fwd[(s.b, s.NC, triton.cdiv(s.H, s.BH))](
        dt, dt_bias, A, dtp, a, s.L, s.H, s.NC, s.Q, dt.stride(0), dt.stride(1),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, BH=s.BH, BQ=s.BQ,
    )  # fmt: skip
    # C_i.B_s is shared by a group's heads: once per group rather than per head.
    cb = torch.empty(s.b, s.NC, s.G, s.Q, s.Q, device=dev, dtype=f32)
    _chunk_cb[lambda meta: (s.b * s.NC * s.G, triton.cdiv(s.Q, meta["BM"]),
                            triton.cdiv(s.Q, meta["BN"]))](
        C, B, cb, s.L, s.G, s.NC, s.Q, s.N, C.stride(0), C.stride(1), B.stride(0), B.stride(1),
        PREC=s.prec,
    )  # fmt: skip
    own = _chunk_outer_call(x, B, dtp, a, s, state=True)
    states = torch.empty(own.shape, device=dev, dtype=x.dtype)
    final = torch.empty(s.b, s.H, s.P, s.N, device=dev, dtype=f32)
    _state_passing_fwd[lambda meta: (s.b * s.H, triton.cdiv(s.P * s.N, meta["BLOCK"]))](
        own, states, a, init, final, s.H, s.NC, s.Q, s.P * s.N, HAS_INIT=init is not None
    )
    out = torch.empty(s.b, s.L, s.H, s.P, device=dev, dtype=x.dtype)
    ypre = torch.empty_like(out) if z is not None else None
    _chunk_scan_fwd[_rows(s)](
        x, z, C, cb, dtp, a, states, D, out, ypre, *s.dims(),
        x.stride(0), x.stride(1), *(z.stride()[:2] if z is not None else (0, 0)),
        C.stride(0), C.stride(1), out.stride(0), out.stride(1),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        PREC=s.prec, BP=s.BP, BN=s.BN,
    )  # fmt: skip
    return out, final, (dtp, a, cb, states, ypre)


def _cast(t: Tensor, dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """t in dtype: into ``out`` when given, in one pass."""
    return t.to(dtype) if out is None else out.copy_(t)


def _backward(dout, dfinal, x, dt, A, B, C, s: _Shape, D, z, dt_bias, softplus, saved, into=None):
    """The gradients by input name; those of x, B, C and dt written into the tensors
    ``into`` names (any batch and time strides, the rest packed: slices of a wider buffer,
    say), the others fresh."""
    into = into or {}
    dtp, a, cb, states, ypre = saved
    dev, f32 = x.device, torch.float32
    grads = {}
    if z is not None:
        dy, dz = torch.empty_like(ypre), torch.empty_like(z, memory_format=torch.contiguous_format)
        bl, bc = 16, min(256, triton.next_power_of_2(s.H * s.P))
        _gate_bwd[(s.b, triton.cdiv(s.L, bl), triton.cdiv(s.H * s.P, bc))](
            dout, z, ypre, dy, dz, s.L, s.H * s.P, dout.stride(0), dout.stride(1),
            z.stride(0), z.stride(1), dy.stride(0), dy.stride(1), dz.stride(0), dz.stride(1),
            BL=bl, BC=bc,
        )  # fmt: skip
        grads["z"] = dz
    else:
        dy = dout

    # Gradients of the states, entering each chunk and then each chunk's own.
    dstates = _chunk_outer_call(dy, C, dtp, a, s, state=False)
    dinit = torch.empty(s.b, s.H, s.P, s.N, device=dev, dtype=f32)
    da_end = torch.zeros(s.b * s.H, s.NC, device=dev, dtype=f32)
    _state_passing_bwd[lambda meta: (s.b * s.H, triton.cdiv(s.P * s.N, meta["BLOCK"]))](
        dstates, states, dfinal, a, dinit, da_end, s.H, s.NC, s.Q, s.P * s.N,
        HAS_DFINAL=dfinal is not None,
    )  # fmt: skip
    grads["initial_states"] = dinit

    # x, dt (but for its decay), D.
    dx = into["x"] if "x" in into else torch.empty(s.b, s.L, s.H, s.P, device=dev, dtype=x.dtype)
    ddt, da_own = torch.empty_like(dtp), torch.empty_like(dtp)
    dD = torch.zeros(D.shape if D is not None else 1, device=dev, dtype=f32)
    _chunk_scan_bwd_dx[_rows(s)](
        x, dy, dout, z, B, cb, dtp, a, dstates, D, dx, ddt, da_own, dD, *s.dims(),
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dout.stride(0), dout.stride(1),
        *(z.stride()[:2] if z is not None else (0, 0)), B.stride(0), B.stride(1),
        dx.stride(0), dx.stride(1), HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None, PREC=s.prec, BP=s.BP,
        BN=s.BN,
    )  # fmt: skip
    grads["x"] = dx
    if D is not None:
        grads["D"] = dD.to(D.dtype)

    # B and C: through C_i.B_s inside chunks, and through the states.
    dcb, da_cb = torch.zeros_like(cb), torch.zeros_like(dtp)
    _chunk_scan_bwd_dcb[lambda meta: s.split_grid(
        meta["HEADS"], triton.cdiv(s.Q, meta["BM"]) * triton.cdiv(s.Q, meta["BK"]))](
        x, dy, cb, dtp, a, dcb, da_cb, *s.dims(),
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), PREC=s.prec, BP=s.BP,
    )  # fmt: skip
    dC_off = torch.zeros(s.b, s.L, s.G, s.N, device=dev, dtype=f32)
    dB_own, da_off = torch.zeros_like(dC_off), torch.empty_like(dtp)
    rows = lambda meta: s.split_grid(meta["HEADS"], triton.cdiv(s.Q, meta["BM"]))  # noqa: E731
    for u, v, m, out, entering in ((dy, C, states, dC_off, True), (x, B, dstates, dB_own, False)):
        _state_grad[rows](
            u, v, m, dtp, a, out, da_off, *s.dims(), u.stride(0), u.stride(1),
            v.stride(0), v.stride(1), ENTERING=entering, PREC=s.prec, BP=s.BP, BN=s.BN,
        )  # fmt: skip
    for out, v, trans in ((dC_off, B, False), (dB_own, C, True)):
        _chunk_cb_bwd[lambda meta: (s.b * s.NC * s.G, triton.cdiv(s.Q, meta["BM"]),
                                    triton.cdiv(s.N, meta["BN"]))](
            dcb, v, out, s.L, s.G, s.NC, s.Q, s.N, v.stride(0), v.stride(1), TRANS=trans,
            PREC=s.prec,
        )  # fmt: skip
    grads["C"] = _cast(dC_off, C.dtype, into.get("C"))
    grads["B"] = _cast(dB_own, B.dtype, into.get("B"))

    # dt and A, through the decays.
    ddt_out = torch.empty(s.b, s.L, s.H, device=dev, dtype=f32)
    dA = torch.empty(s.b, s.NC, s.H, device=dev, dtype=f32)
    dbias = torch.empty_like(dA)
    _dt_cumsum_bwd[(s.b, s.NC, triton.cdiv(s.H, s.BH))](
        dt, dt_bias, A, dtp, ddt, da_own, da_cb, da_off, da_end, ddt_out, dA, dbias,
        s.L, s.H, s.NC, s.Q, dt.stride(0), dt.stride(1), ddt_out.stride(0), ddt_out.stride(1),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, BH=s.BH, BQ=s.BQ,
    )  # fmt: skip
    grads["dt"] = _cast(ddt_out, dt.dtype, into.get("dt"))
    grads["A"] = dA.sum((0, 1)).to(A.dtype)
    if dt_bias is not None:
        grads["dt_bias"] = dbias.sum((0, 1)).to(dt_bias.dtype)
    return grads


# Custom ops, so torch.compile keeps one graph around the kernels (no graph break); their
# fakes give the outputs' shapes (all contiguous, as the real ones are made).
_GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@torch.library.custom_op("hybridscale::ssd_chunked", mutates_args=())
def ssd_chunked_forward(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
    D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
    initial_states: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, final state, then what the backward reuses: dt, log decays, C.B, chunk states,
    the output before the gate (empty without z))."""
    x, dt, B, C = _packed(x), _packed(dt), _packed(B), _packed(C)
    z = _packed(z) if z is not None else None
    s = _Shape(x, B, chunk_size)
    D = D.contiguous() if D is not None else None
    init = initial_states.contiguous() if initial_states is not None else None
    with torch.autocast(x.device.type, enabled=False):  # keep C_i.B_s in fp32
        out, final, saved = _forward(x, dt, A, B, C, s, D, z, dt_bias, dt_softplus, init)
    dtp, a, cb, states, ypre = saved
    return out, final, dtp, a, cb, states, ypre if ypre is not None else out.new_empty(0)


@ssd_chunked_forward.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states):
    (b, L, H, P), (G, N) = x.shape, B.shape[2:]
    Q, NC = chunk_size, (L + chunk_size - 1) // chunk_size
    f32 = {"dtype": torch.float32}
    decays = x.new_empty(b, H, NC, Q, **f32)
    return (x.new_empty(b, L, H, P), x.new_empty(b, H, P, N, **f32), decays,
            torch.empty_like(decays), x.new_empty(b, NC, G, Q, Q, **f32),
            x.new_empty(b, NC, H, P, N),
            x.new_empty(b, L, H, P) if z is not None else x.new_empty(0))  # fmt: skip


@torch.library.custom_op("hybridscale::ssd_chunked_backward", mutates_args=())
def _ssd_backward(
    dout: Tensor, dfinal: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
    C: Tensor, chunk_size: int, D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None,
    dt_softplus: bool, initial_states: Tensor | None, dtp: Tensor, a: Tensor, cb: Tensor,
    states: Tensor, ypre: Tensor,
) -> list[Tensor]:  # fmt: skip
    """The gradients of _GRADS, in that order; empty for an absent input."""
    x, dt, B, C = _packed(x), _packed(dt), _packed(B), _packed(C)
    z = _packed(z) if z is not None else None
    D = D.contiguous() if D is not None else None
    dfinal = dfinal.contiguous() if dfinal is not None else None
    saved = (dtp, a, cb, states, ypre if z is not None else None)
    with torch.autocast(x.device.type, enabled=False):
        grads = _backward(_packed(dout), dfinal, x, dt, A, B, C, _Shape(x, B, chunk_size), D,
                          z, dt_bias, dt_softplus, saved)  # fmt: skip
    if initial_states is not None:
        grads["initial_states"] = grads["initial_states"].to(initial_states.dtype)
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    return [grads[name].contiguous() if t is not None else x.new_empty(0)
            for name, t in zip(_GRADS, inputs, strict=True)]  # fmt: skip


@_ssd_backward.register_fake
def _(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states,
      dtp, a, cb, states, ypre):  # fmt: skip
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    return [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in inputs]


def _ssd_save(ctx, inputs: tuple, output: tuple) -> None:
    x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias, ctx.softplus, init = inputs
    ctx.mark_non_differentiable(*output[2:])
    # No zero gradients for the outputs that got none (the final state, unless asked for,
    # and the intermediates): their zero-fill took 3% of the scan's time on an H100.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, init, *output[2:])


def _ssd_grads(ctx, dout: Tensor, dfinal: Tensor | None, *_intermediates) -> tuple:
    x, dt, A, B, C, D, z, dt_bias, init, *saved = ctx.saved_tensors
    dout = dout if dout is not None else torch.zeros_like(x)  # only the final state used
    grads = _ssd_backward(dout, dfinal, x, dt, A, B, C, ctx.chunk_size, D, z, dt_bias,
                          ctx.softplus, init, *saved)  # fmt: skip
    grads = dict(zip(_GRADS, grads, strict=True))
    inputs = ("x", "dt", "A", "B", "C", None, "D", "z", "dt_bias", None, "initial_states")
    return tuple(grads[name] if need else None
                 for name, need in zip(inputs, ctx.needs_input_grad, strict=True))  # fmt: skip


ssd_chunked_forward.register_autograd(_ssd_grads, setup_context=_ssd_save)


def ssd_chunked_backward(
    dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
    D: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, saved: tuple,
    into: dict[str, Tensor],
) -> dict[str, Tensor]:  # fmt: skip
    """The backward of ``hybridscale::ssd_chunked`` without a gate, initial or final state
    (``saved``: the op's outputs dt, log decays, C.B and chunk states), for ops that fuse
    the scan with its neighbours: the gradients by name, those of x, B, C and dt written
    into the tensors ``into`` names (see _backward)."""
    x, dt, B, C, dout = _packed(x), _packed(dt), _packed(B), _packed(C), _packed(dout)
    with torch.autocast(x.device.type, enabled=False):
        return _backward(dout, None, x, dt, A, B, C, _Shape(x, B, chunk_size), D, None,
                         dt_bias, dt_softplus, (*saved, None), into)  # fmt: skip


def ssd_chunked_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``arch.ssd.ssd_chunked`` on Triton kernels: same arguments, same results."""
    B, C = B.to(x.dtype), C.to(x.dtype)  # one dtype for the tensor-core products
    y, final, *_ = ssd_chunked_forward(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_states
    )
    return (y, final) if return_final_states else y
