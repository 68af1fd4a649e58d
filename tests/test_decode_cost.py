import math

import pytest
import torch

from arch.config import ModelConfig
from arch.decode_cost import (
    H100,
    Calibration,
    _OpRecorder,
    _roofline,
    calibrate,
    decode_flops,
    decode_seconds_per_token,
    decode_step_seconds,
    decode_traffic,
    trace_decode_step,
)
from arch.model import HybridLM

# Attention (4 heads of 8, 2 KV heads), MLP (d_ffn 64), Mamba-2 (E 64, 4 heads of 16,
# state 8, one group, conv 4): small enough to count by hand.
HAND = ModelConfig(
    pattern="*-M", d_model=32, n_heads=4, n_kv_heads=2, d_ffn=64, vocab_size=50,
    tie_embeddings=False, d_state=8, ssm_headdim=16, d_conv=4, expand=2,
)  # fmt: skip


def test_traffic_hand_computed():
    batch, context = 3, 10
    attention = 32 * 32 + 32 * 2 * 16 + 32 * 32  # q, k/v (2 heads x 8 each), out
    mlp = 32 * 64 + 64 * 32
    in_proj = 32 * (2 * 64 + 2 * 8 + 4)  # z, x, B, C, dt
    mamba = in_proj + (64 + 16) * (4 + 1) + 3 * 4 + 64 + 64 * 32  # conv, dt/A/D, norm, out
    norms = 4 * 32
    weights = attention + mlp + mamba + norms + 50 * 32 + batch * 32  # LM head, batch's rows
    traffic = decode_traffic(HAND, batch, context)
    assert traffic["weights"] == 2 * weights
    assert traffic["kv_cache"] == 2 * 2 * batch * 16 * context  # K and V, 2 heads x 8, bf16
    assert traffic["ssm_state"] == 2 * 4 * batch * 4 * 16 * 8  # fp32, read and written
    assert traffic["conv_state"] == 2 * 2 * batch * (64 + 2 * 8) * 4


def test_flops_hand_computed():
    batch, context = 3, 10
    matrices = 50 * 32 + (32 * 32 + 32 * 32 + 32 * 32) + 2 * 32 * 64 + (32 * 148 + 64 * 32)
    attention = 4 * 4 * 8 * context  # q.k and p.v over the cache, 4 heads of 8
    mamba = 6 * 64 * 8 + 2 * 4 * (64 + 16)
    expected = batch * (2 * matrices + attention + mamba)
    assert decode_flops(HAND, batch, context) == expected


def test_static_cache_sizes_are_the_closed_form_states():
    # The closed form's KV cache and states are what the model really allocates.
    caches = HybridLM(HAND).to(torch.bfloat16).allocate_caches(3, 10)
    allocated = sum(t.numel() * t.element_size() for c in caches for t in c.values()
                    if t.dim() > 0)  # fmt: skip
    traffic = decode_traffic(HAND, 3, 10)
    assert allocated == traffic["kv_cache"] + (traffic["ssm_state"] + traffic["conv_state"]) / 2


def test_traced_matmul_flops_match_the_closed_form():
    # A Transformer's decode FLOPs are all matmuls: the op-by-op trace must agree exactly.
    config = ModelConfig(pattern="*-*-", d_model=64, n_heads=4, n_kv_heads=2, vocab_size=100)
    ops = trace_decode_step(config, batch=5, context=37)
    assert sum(op.flops for op in ops) == decode_flops(config, 5, 37)


def test_the_implementation_moves_at_least_the_essential_bytes():
    config = ModelConfig(pattern="M*-M", d_model=64, n_heads=4, d_state=16, ssm_headdim=16)
    for batch, context in [(1, 16), (8, 512)]:
        traced = sum(op.bytes for op in trace_decode_step(config, batch, context))
        essential = sum(decode_traffic(config, batch, context).values())
        assert essential <= traced < 10 * essential


def _sized(pattern: str, **overrides) -> ModelConfig:
    return ModelConfig(pattern=pattern, d_model=512, n_heads=8, vocab_size=1000, **overrides)


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_cost_grows_with_context_for_attention_only(implementation):
    def cost(c, batch, context):
        return decode_step_seconds(c, batch, context, implementation=implementation)

    transformer, mamba2 = _sized("*-*-"), _sized("MMMM")
    assert cost(transformer, 4, 1024) < cost(transformer, 4, 8192) < cost(transformer, 4, 65536)
    assert cost(mamba2, 4, 1024) == cost(mamba2, 4, 65536)
    for c in (transformer, mamba2):
        assert cost(c, 1, 4096) < cost(c, 16, 4096) < cost(c, 64, 4096)


@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_more_attention_layers_cost_more_at_long_context(implementation):
    few = ModelConfig(n_layers=24, attention_ratio=0.08, mlp_ratio=0.5, d_model=512, n_heads=8)
    many = ModelConfig(n_layers=24, attention_ratio=0.25, mlp_ratio=0.5, d_model=512, n_heads=8)
    assert few.pattern.count("*") < many.pattern.count("*")
    cost = [decode_step_seconds(c, 16, 32768, implementation=implementation) for c in (few, many)]
    assert cost[0] < cost[1]
    deeper = [decode_step_seconds(_sized(p), 4, 4096, implementation=implementation)
              for p in ("M*-", "M*-M*-")]  # fmt: skip
    assert deeper[0] < deeper[1]


def test_seconds_per_token_amortise_weights_over_the_batch():
    config = _sized("MMMM")
    assert decode_seconds_per_token(config, 1, 4096) == decode_step_seconds(config, 1, 4096)
    assert decode_seconds_per_token(config, 16, 4096) < decode_seconds_per_token(config, 1, 4096)


def _attention_blocks(config: ModelConfig, batch: int, context: int) -> list[float]:
    return [op.blocks for op in trace_decode_step(config, batch, context) if op.name == "bmm"]


def test_grouped_query_attention_has_few_blocks_to_stream_v_with():
    # 8 query heads of 64 on 2 KV heads: each KV head's 4 query rows are one product.
    gqa = _sized("*", n_kv_heads=2)
    scores, values = _attention_blocks(gqa, batch=3, context=1000)
    assert scores == 3 * 2 * math.ceil(1000 / 128)  # (4 x 1000) per head: 8 column tiles
    assert values == 3 * 2  # (4 x 64) per head: one tile, the 1000 keys not split
    # one query row per head: matrix-vector products, split over the keys
    assert _attention_blocks(_sized("*"), 3, 1000) == [math.inf, math.inf]


def test_few_blocks_cap_the_bandwidth():
    cal = Calibration(matmul_bandwidth=0.5, other_bandwidth=0.5, flops_fraction=0.5,
                      launch_s=2e-6, block_bandwidth=20e9)  # fmt: skip
    matmul = [0]  # index of "matmul" in KINDS
    many = _roofline(matmul, [1e9], [0.0], [math.inf], 1, cal, H100)
    assert many == pytest.approx(1e9 / (0.5 * H100.bandwidth) + 2e-6)
    four = _roofline(matmul, [1e9], [0.0], [4], 1, cal, H100)
    assert four == pytest.approx(1e9 / (4 * 20e9) + 2e-6)  # 4 blocks of 20 GB/s


def test_reference_gqa_attention_costs_more_per_byte_at_small_batch():
    # The same KV bytes cost more time when they are spread over fewer blocks: per sequence,
    # GQA's step at batch 1 (2 blocks stream V) grows with context several times faster
    # than at batch 16 (32 blocks); at full bandwidth the two would grow alike.
    gqa = _sized("*-", n_kv_heads=2)

    def growth(batch):
        cost = [decode_step_seconds(gqa, batch, t, implementation="reference")
                for t in (1024, 65536)]  # fmt: skip
        return (cost[1] - cost[0]) / batch

    assert growth(1) > 3 * growth(16) > 0


def test_calibrate_recovers_the_constants_it_was_measured_with():
    truth = Calibration(matmul_bandwidth=0.45, other_bandwidth=0.55, flops_fraction=0.4,
                        launch_s=5e-6, block_bandwidth=12e9)  # fmt: skip
    grid = [(_sized("*-M-"), 1, 512), (_sized("*-M-"), 64, 8192), (_sized("MMMM"), 256, 128),
            (_sized("*-*-", d_ffn=8192), 1, 256), (_sized("M"), 1, 64),
            (_sized("*-"), 8, 65536), (_sized("MM-"), 32, 64),
            (_sized("*-M", n_kv_heads=2), 2, 65536),  # few blocks stream V
            (ModelConfig(pattern="--", d_model=2048, d_ffn=32768), 1, 1)]  # fmt: skip
    measurements = [
        {"config": c.model_dump(), "batch": b, "context": t,
         "seconds": decode_step_seconds(c, b, t, truth, implementation="reference")}
        for c, b, t in grid
    ]  # fmt: skip
    fitted = calibrate(measurements)
    for name in ("matmul_bandwidth", "other_bandwidth", "launch_s", "block_bandwidth"):
        # within 1%: calibrate's weak pull to the defaults biases it that little
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-2), name
    with pytest.raises(ValueError, match="at least one"):
        calibrate([])


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="'fused' or 'reference'"):
        decode_step_seconds(HAND, 1, 8, implementation="flash")


def tiny_lm() -> HybridLM:
    torch.manual_seed(0)
    config = ModelConfig(
        pattern="M*m-*", d_model=32, vocab_size=50, n_heads=4, n_kv_heads=2,
        rotary_fraction=0.5, d_state=8, mamba1_d_state=4, ssm_headdim=16, chunk_size=4,
    )  # fmt: skip
    return HybridLM(config).eval()


@pytest.mark.parametrize("prefill", [1, 6])
def test_static_cache_decode_matches_parallel_forward(prefill):
    model = tiny_lm()
    tokens = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        full = model(tokens)
        caches = model.allocate_caches(2, 16)  # longer than needed: unused slots are masked
        buffers = [t.data_ptr() for c in caches for t in c.values()]
        steps = [model(tokens[:, :prefill], caches)]
        steps += [model(tokens[:, t : t + 1], caches) for t in range(prefill, 13)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    # updated in place: a CUDA graph captured on these buffers sees every step
    assert [t.data_ptr() for c in caches for t in c.values()] == buffers
    assert all(int(c["pos"]) == 13 for c in caches if "pos" in c)


def test_traced_bytes_skip_what_the_l2_cache_still_holds():
    small = torch.empty(1000, device="meta")  # 4 kB
    big = torch.empty(20_000_000, device="meta")  # 80 MB, more than an H100's 50 MB of L2
    with _OpRecorder() as recorder:
        twice = small * 2  # read 4 kB from memory, write 4 kB
        _ = twice + 1  # twice is still in L2: only the write
        doubled = big * 2
        _ = doubled + 1  # doubled no longer fits L2: read again
    assert [op.bytes for op in recorder.ops] == [8000, 4000, 160e6, 160e6]
