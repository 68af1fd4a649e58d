import random

import pytest
import torch

from arch.accounting import flops_per_token, param_counts
from arch.config import ModelConfig
from arch.layers.attention import Attention, apply_rotary, rotary_tables
from arch.layers.mlp import MLP
from arch.model import HybridLM


def random_config(rng: random.Random) -> ModelConfig:
    n_heads = rng.choice([1, 2, 4])
    headdim = rng.choice([8, 16])
    return ModelConfig(
        pattern="".join(rng.choice("Mm*-") for _ in range(rng.randint(1, 6))),
        d_model=n_heads * rng.choice([8, 16]),
        vocab_size=rng.randint(10, 300),
        tie_embeddings=rng.random() < 0.5,
        n_heads=n_heads,
        n_kv_heads=rng.choice([n for n in (1, 2, 4) if n_heads % n == 0]),
        d_ffn=rng.choice([None, 24, 40]),
        mlp_activation=rng.choice(["squared_relu", "swiglu", "gelu"]),
        d_state=rng.choice([4, 8, 16]),
        mamba1_d_state=rng.choice([2, 4]),
        d_conv=rng.choice([2, 3, 4]),
        expand=2,
        ssm_headdim=headdim,
        ssm_ngroups=1,
    )


@pytest.mark.parametrize("seed", range(24))
def test_param_counts_closed_form(seed):
    config = random_config(random.Random(seed))
    model = HybridLM(config)
    assert param_counts(config)["total"] == sum(p.numel() for p in model.parameters())


def test_param_counts_by_type():
    config = ModelConfig(pattern="M*-m", d_model=32, n_heads=4, ssm_headdim=16, d_state=8)
    model = HybridLM(config)
    counts = param_counts(config)
    by_symbol = {"M": "mamba2", "*": "attention", "-": "mlp", "m": "mamba1"}
    for block in model.blocks:
        assert counts[by_symbol[block.symbol]] == sum(p.numel() for p in block.parameters())


def test_flops_hand_computed():
    # "*-" with d=64, V=256, d_ffn=256, seqlen 128, no grouping, squared ReLU:
    # LM head 2*256*64 = 32768; attention matmuls 2*(4*64*64) = 32768 and its
    # sequence term 4*64*128 = 32768; MLP 2*(2*64*256) = 65536.
    config = ModelConfig(pattern="*-", d_model=64, vocab_size=256, d_ffn=256)
    flops = flops_per_token(config, seq_len=128)
    assert flops["forward"] == 32768 + 32768 + 32768 + 65536
    assert flops["training"] == 3 * flops["forward"]


def test_flops_match_the_6n_rule_for_a_transformer():
    # 6N + 12 * layers * d * L, N counting the weight matrices and the LM head.
    config = ModelConfig(
        pattern="*-" * 3, d_model=96, vocab_size=500, n_heads=4, tie_embeddings=False
    )
    counts = param_counts(config)
    norms = config.d_model * (len(config.pattern) + 1)
    n = counts["total"] - counts["embedding"] - norms
    assert flops_per_token(config, 512)["training"] == 6 * n + 12 * 3 * 96 * 512


def test_flops_grow_with_context_only_through_sequence_layers():
    mlp_only = ModelConfig(pattern="--", d_model=32)
    attention = ModelConfig(pattern="*-", d_model=32)
    assert flops_per_token(mlp_only, 128) == flops_per_token(mlp_only, 4096)
    assert flops_per_token(attention, 4096)["forward"] > flops_per_token(attention, 128)["forward"]


def check_decode(layer, d_model: int, seqlen: int = 12, prefill: int = 5, atol: float = 1e-4):
    torch.manual_seed(0)
    x = torch.randn(2, seqlen, d_model)
    with torch.no_grad():
        full = layer(x)
        cache: dict = {}
        outs = [layer(x[:, :prefill], cache=cache)]
        outs += [layer(x[:, t : t + 1], cache=cache) for t in range(prefill, seqlen)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=atol, rtol=0)


@pytest.mark.parametrize("n_kv_heads, rotary", [(None, 0.0), (2, 0.5), (1, 1.0)])
@pytest.mark.parametrize("prefill", [1, 5])
def test_attention_decode_matches_parallel(n_kv_heads, rotary, prefill):
    check_decode(Attention(32, 4, n_kv_heads, rotary), 32, prefill=prefill)


def test_rotary_frequencies_are_exact_and_rotations_relative():
    layer = Attention(32, 4, rotary_fraction=0.5)  # head_dim 8: 4 rotated channels
    by_hand = torch.tensor([1.0, 10000 ** (-2 / 4)])  # base^(-2i / rotated channels)
    torch.testing.assert_close(layer.inv_freq, by_hand)
    layer.to(torch.bfloat16)  # bf16 weights, fp32 frequencies
    assert layer.qkv_proj.weight.dtype == torch.bfloat16
    assert layer.inv_freq.dtype == torch.float32
    torch.testing.assert_close(layer.inv_freq, by_hand)

    q, k = torch.randn(2, 8)

    def score(m: int, n: int) -> float:  # q at position m against k at position n
        cos, sin = rotary_tables(torch.tensor([m, n]), layer.inv_freq)
        return float(apply_rotary(q, cos[0], sin[0]) @ apply_rotary(k, cos[1], sin[1]))

    assert score(7, 3) == pytest.approx(score(1007, 1003), abs=1e-3)  # only m - n counts
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    cos, sin = rotary_tables(torch.tensor([0]), layer.inv_freq)
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), q)  # position 0: no turn


def test_attention_is_causal():
    layer = Attention(32, 4, 2, 0.5)
    x = torch.randn(1, 10, 32)
    y = torch.randn(1, 10, 32)
    y[:, :6] = x[:, :6]
    torch.testing.assert_close(layer(x)[:, :6], layer(y)[:, :6])


def test_mlp_activations():
    x = torch.randn(3, 16)
    mlp = MLP(16, 8, "squared_relu")
    h = x @ mlp.up_proj.weight.T
    torch.testing.assert_close(mlp(x), torch.relu(h).square() @ mlp.down_proj.weight.T)
    gated = MLP(16, 8, "swiglu")
    gate, up = (x @ gated.up_proj.weight.T).chunk(2, dim=-1)
    torch.testing.assert_close(
        gated(x), (torch.nn.functional.silu(gate) * up) @ gated.down_proj.weight.T
    )


def tiny_lm(pattern: str = "M*m-") -> HybridLM:
    torch.manual_seed(0)
    config = ModelConfig(
        pattern=pattern, d_model=32, vocab_size=50, n_heads=4, n_kv_heads=2, rotary_fraction=0.5,
        d_state=8, mamba1_d_state=4, ssm_headdim=16, chunk_size=4,
    )  # fmt: skip
    return HybridLM(config).eval()


@pytest.mark.parametrize("prefill", [1, 6])
def test_lm_decode_matches_parallel(prefill):
    model = tiny_lm()
    tokens = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        full = model(tokens)
        caches: list[dict] = [{} for _ in model.blocks]
        steps = [model(tokens[:, :prefill], caches)]
        steps += [model(tokens[:, t : t + 1], caches) for t in range(prefill, 13)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_greedy_generate_matches_recomputed_argmax():
    model = tiny_lm()
    prompt = torch.randint(0, 50, (2, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(expected)[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat((expected, nxt), dim=1)
    assert torch.equal(out, expected)


def test_top_k_sampling_stays_in_top_k():
    model = tiny_lm("*-")
    prompt = torch.randint(0, 50, (1, 3))
    generator = torch.Generator().manual_seed(0)
    out = model.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=3, generator=generator)
    with torch.no_grad():
        top3 = model(prompt)[0, -1].topk(3).indices
    assert out[0, -1] in top3


def test_tied_embeddings_share_storage():
    model = tiny_lm()
    assert model.lm_head.weight is model.embedding.weight


@pytest.mark.parametrize("symbol", ["M", "m", "*", "-"])
def test_each_block_traces_into_one_graph(symbol):
    """torch.compile sees every block whole: no graph break inside a layer (the reference
    path; the Triton kernels' path in tests/test_kernels.py)."""
    config = ModelConfig(pattern=symbol, d_model=32, n_heads=4, d_state=8, ssm_headdim=16,
                         chunk_size=16, vocab_size=264, rotary_fraction=0.5)  # fmt: skip
    block = HybridLM(config).blocks[0]
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(block)(torch.randn(2, 40, 32))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
