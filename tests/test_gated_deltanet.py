"""The gated DeltaNet layer (G) against the paper's recurrence, and G through every part of
the repository the registry reaches: specs, search, accounting, decode cost, analysis."""

import math

import pytest
import torch
import torch.nn.functional as F

from analysis.extrapolate import is_hybrid_axis, paper_target
from analysis.table import mix_of
from arch.accounting import flops_per_token, param_counts
from arch.config import ModelConfig
from arch.decode_cost import decode_flops, decode_step_seconds, decode_traffic
from arch.layers.gated_deltanet import (
    GatedDeltaNet,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
)
from arch.model import HybridLM
from runners.search_schema import Budget
from runners.search_space import Corner, build_pattern, candidate, decode_bytes
from runners.spec import StudySpec

# d 32, 4 heads of d_k 8 and d_v 16: key width 32, value width 64, conv channels 128
SMALL = {"d_model": 32, "gdn_head_dim": 8, "n_heads": 4, "vocab_size": 50}


def paper_recurrence(q, k, v, g, beta, state):
    """Yang et al. 2024, eq. (10), in their layout (S is d_v x d_k), one explicit matrix at
    a time: S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t."""
    out = torch.empty(*v.shape, dtype=torch.float64)
    S = state.transpose(-1, -2).double().clone()  # (b, h, d_v, d_k)
    eye = torch.eye(k.shape[-1], dtype=torch.float64)
    for t in range(q.shape[1]):
        qt, kt, vt = q[:, t].double(), k[:, t].double(), v[:, t].double()
        alpha, b = g[:, t].double().exp()[..., None, None], beta[:, t].double()[..., None, None]
        S = S @ (alpha * (eye - b * kt[..., :, None] * kt[..., None, :]))
        S = S + b * vt[..., :, None] * kt[..., None, :]
        out[:, t] = (S @ qt[..., None])[..., 0]
    return out, S.transpose(-1, -2)


def rule_inputs(batch=2, seqlen=37, heads=3, d_k=8, d_v=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, seqlen, heads, d_k, generator=gen), dim=-1) * d_k**-0.5
    k = F.normalize(torch.randn(batch, seqlen, heads, d_k, generator=gen), dim=-1)
    v = torch.randn(batch, seqlen, heads, d_v, generator=gen)
    g = -torch.rand(batch, seqlen, heads, generator=gen)  # log decay: alpha in (e^-1, 1]
    beta = torch.rand(batch, seqlen, heads, generator=gen)
    state = torch.randn(batch, heads, d_k, d_v, generator=gen)
    return q, k, v, g, beta, state


def test_recurrent_rule_is_the_papers():
    q, k, v, g, beta, state = rule_inputs()
    o, final = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o_ref, final_ref = paper_recurrence(q, k, v, g, beta, state)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])  # 37 positions: ragged last chunk
def test_chunked_rule_matches_the_recurrence(chunk_size):
    q, k, v, g, beta, state = rule_inputs()
    o_ref, final_ref = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    o, final = gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-5)


def test_chunked_rule_survives_strong_decay():
    """Decay ratios within a chunk are exponentiated after masking, so a near-zero alpha
    (g = -50 a step, far below fp32's range over a chunk) gives no inf or NaN."""
    q, k, v, g, beta, _ = rule_inputs(seqlen=64)
    o, final = gated_delta_rule_chunked(q, k, v, g * 50, beta, chunk_size=64)
    o_ref, final_ref = gated_delta_rule_recurrent(q, k, v, g * 50, beta)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-5)


def test_parameters_counted_in_closed_form():
    layer = GatedDeltaNet(32, head_dim=8, expand=2, d_conv=4)
    # in_proj 32 x (128 + 64 + 2 x 4), out_proj 64 x 32, conv 128 x 4 (no bias), A_log and
    # dt_bias 4 each, the norm's 16
    assert sum(p.numel() for p in layer.parameters()) == 6400 + 2048 + 512 + 8 + 16
    config = ModelConfig(pattern="G*G-", **SMALL)
    model = HybridLM(config)
    assert param_counts(config)["total"] == sum(p.numel() for p in model.parameters())
    assert param_counts(config)["gated_deltanet"] == 2 * (6400 + 2048 + 512 + 8 + 16 + 32)


def test_flops_counted_by_hand():
    config = ModelConfig(pattern="G", **SMALL)
    # At L = 16 the chunk is 16. Per head: K K^T and Q K^T 2 x 2 x 16 x 8 = 512, the two
    # solves 2 x 16 x (16 + 8) = 768, scores x U 2 x 16 x 16 = 512, the state products
    # 3 x 2 x 8 x 16 = 768: 2560, x 4 heads = 10240; the conv 2 x 4 x 128 = 1024.
    # Matmuls: 2 x (LM head 50 x 32 + in_proj 6400 + out_proj 2048) = 20096.
    assert flops_per_token(config, 16)["forward"] == 20096 + 10240 + 1024


def test_decode_state_and_traffic():
    config = ModelConfig(pattern="G*G-", **SMALL)
    state = 4 * 8 * 16  # 4 heads of d_k x d_v
    traffic = decode_traffic(config, batch=3, context=100)
    assert traffic["ssm_state"] == 2 * 4 * 3 * 2 * state  # fp32, read and written, 2 layers
    assert traffic["conv_state"] == 2 * 2 * 3 * 2 * 128 * 4
    assert traffic["kv_cache"] == 2 * 3 * 2 * 32 * 100  # the one attention layer
    kv = 2 * 32 * 100
    assert decode_bytes(config, 100) == 2 * (param_counts(config)["total"] + kv
                                             + 2 * (state + 128 * 4))  # fmt: skip
    # per G layer: 7 d_k d_v per head, the conv 2 x 4 x 128; attention 4 d T
    matrices = 50 * 32 + 2 * (6400 + 2048) + 2 * 32 * 32 * 2 + 32 * 128 * 2
    per_layer = 2 * (7 * state + 1024) + 4 * 32 * 100
    assert decode_flops(config, 1, 100) == 2 * matrices + per_layer
    assert decode_step_seconds(config, 1, 100, implementation="reference") > 0


def cached_decode(model, tokens, prompt, caches):
    out = [model(tokens[:, :prompt], caches)]
    out += [model(tokens[:, t : t + 1], caches) for t in range(prompt, tokens.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("static", [False, True])
def test_token_by_token_decode_matches_the_full_forward(static):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="G*G-", **SMALL)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        caches = model.allocate_caches(2, 12) if static else [{} for _ in model.blocks]
        decoded = cached_decode(model, tokens, 5, caches)
        torch.testing.assert_close(decoded, model(tokens), atol=1e-5, rtol=1e-5)


def test_a_g_pattern_trains():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="G*G-", **SMALL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.arange(33).repeat(4, 1) % 7  # a cycle a model learns in a few steps
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_specs_search_and_analysis_know_g():
    # a spec pattern with G validates; the search places G like Mamba-1, sizes it by width
    config = ModelConfig(pattern="G*G-", **SMALL)
    assert config.rotary_fraction == 0.0  # G carries position, as the paper's SSM layers
    with pytest.raises(ValueError, match="gdn_head_dim"):
        ModelConfig(pattern="G", d_model=36, gdn_head_dim=8)
    with pytest.raises(ValueError, match="unknown symbol.*G \\(GatedDeltaNet\\)"):
        ModelConfig(pattern="GX")
    # attention at slot 2 of 4; G spread over Mamba-2's slots 0, 1, 3: positions 0 and 2
    assert build_pattern({"mamba2": 1, "gated_deltanet": 2, "attention": 1}) == "GM*G"
    spec = StudySpec.model_validate({
        "name": "g", "model": {"n_heads": 4, "gdn_head_dim": 16, "vocab_size": 264},
        "data": {"seq_len": 64}, "training": {"tokens": 1000},
        "search": {"budget": Budget(params=200_000).model_dump(),
                   "space": {"gated_deltanet": {"low": 1, "high": 3}, "attention": 1,
                             "mlp": 2}},
    })  # fmt: skip
    for high in (False, True):
        trial = candidate(spec, Corner(high))
        assert trial.model.pattern.count("G") == (3 if high else 1)
        assert trial.model.d_model % 16 == 0
        assert abs(param_counts(trial.model)["total"] / 200_000 - 1) < 0.05
    # analysis: a G hybrid is its own family, not a Transformer, and extrapolates
    assert mix_of("G*G-").label == "GatedDeltaNet-Hybrid (attn 0.25, mlp 0.25)"
    assert mix_of("GGGG").label == "GatedDeltaNet" and is_hybrid_axis(mix_of("GGGG"))
    target = paper_target(mix_of("G*G-"))
    assert set(target.config.pattern) == {"G", "*", "-"}
    assert math.isclose(target.params, param_counts(target.config)["total"])
