"""bench/memory_plan.py: its activation model against what autograd really saves (tiny, CPU), the full-size meta
builds against the MoE-LLaVA paper's parameter counts, and the plan's verdict on a setting that cannot fit."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import memory_plan as mp  # noqa: E402

PRESETS = {preset: (name, fn) for name, preset, fn in mp.PRESETS}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, restored afterwards (the shared 2-core dev machine; see bench/common.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("preset", ["moe_llava_stablelm.toml", "moe_llava_qwen_stage2.toml",
                                    "moe_llava_phi2.toml", "mole_llava15.toml"])
def test_activation_model_matches_saved_tensors(preset):
    """MoE + LayerNorm, dense stage II + RMSNorm with trainable norms, Phi's parallel block with GELU experts and
    biases, MoLE's LoRA experts + attention LoRA: measured saved bytes (bf16 autocast on CPU) equal the model's
    within 1%, with activation checkpointing off and on; weight copies too."""
    for ac, r in mp.check_preset(preset, PRESETS[preset][1]).items():
        for kind, (measured, modelled) in r.items():
            assert measured == pytest.approx(modelled, rel=0.01), (preset, ac, kind, measured, modelled)
        assert r["act"][0] > 0 and r["weights"][0] > 0


def test_check_is_not_vacuous():
    """Checkpointing must change what is held (else the on/off comparison proves nothing), and the model must
    notice a term going missing: drop the MoE layers' fp32 router input and the agreement breaks."""
    r = mp.check_preset("moe_llava_stablelm.toml", mp.stablelm_2_1_6b)
    assert r[True]["act"][0] < 0.2 * r[False]["act"][0]
    original = mp.moe_layer
    try:
        mp.moe_layer = lambda m, S: original(m, S) + mp.Saved(act=-S * mp.F32 * m.router.in_features)
        measured, modelled = mp.check_preset("moe_llava_stablelm.toml", mp.stablelm_2_1_6b)[False]["act"]
    finally:
        mp.moe_layer = original
    assert abs(measured / modelled - 1) > 0.01


@pytest.mark.parametrize("preset", list(mp.PAPER))
def test_full_size_parameters_match_the_paper(preset):
    """The meta build at real size: LM total and active parameters (embeddings in, experts at 2/4) within 3% of
    MoE-LLaVA's Table 1 (2.9B/2.0B, 3.1B/2.2B, 5.3B/3.6B, which are rounded to 0.1B); the stage-III trainable set
    is every FFN + routers + projector."""
    cfg, model = mp.build(preset, PRESETS[preset][1])
    assert all(p.is_meta for p in model.parameters())
    c = mp.param_counts(model)
    total, active = mp.PAPER[preset]
    assert c["lm"] == pytest.approx(total, rel=0.03) and c["active"] == pytest.approx(active, rel=0.03)
    ffn = sum(p.numel() for n, p in model.lm.named_parameters() if ".mlp." in n)
    assert c["trainable"] == ffn + sum(p.numel() for p in model.projector.parameters())


def test_stablelm_counts_exact():
    """StableLM-2-1.6B x4, counted by hand: embeddings + lm_head 2 x 100352 x 2048; 24 attention blocks of 4 x 2048^2
    + 3 x 2048 q/k/v biases; 12 dense + 12 x 4 expert SwiGLUs of 3 x 2048 x 5632; 12 routers 2048 x 4; 49 LayerNorms."""
    cfg, model = mp.build("moe_llava_stablelm.toml", mp.stablelm_2_1_6b)
    D, F, V = 2048, 5632, 100352
    lm = 2 * V * D + 24 * (4 * D * D + 3 * D) + (12 + 48) * 3 * D * F + 12 * D * 4 + 49 * 2 * D
    assert mp.param_counts(model)["lm"] == lm


def test_oversized_setting_is_flagged_and_a_setting_named():
    """Micro-batch 64 without checkpointing cannot fit an 80 GB card; the plan says so and names a change that
    does fit, by its train.py override."""
    p = mp.plan("oversized", "moe_llava_stablelm.toml", mp.stablelm_2_1_6b,
                overrides=["train.micro_batch_size=64", "train.activation_checkpointing=false"])
    assert p.verdict == "does not fit" and p.total > mp.CARD / mp.GiB
    assert p.advice.startswith("set train.") and "GiB" in p.advice
    setting = p.advice.split()[1]
    fixed = mp.plan("fixed", "moe_llava_stablelm.toml", mp.stablelm_2_1_6b,
                    overrides=["train.micro_batch_size=64", "train.activation_checkpointing=false", setting])
    assert fixed.verdict == "fits"


def test_presets_plan():
    """The shipped StableLM stage-III presets fit; STGC adds its hook buffers and nothing else."""
    plain = mp.plan("plain", "moe_llava_stablelm.toml", mp.stablelm_2_1_6b)
    stgc = mp.plan("stgc", "moe_llava_stablelm.toml+stgc.toml", mp.stablelm_2_1_6b)
    assert plain.verdict == "fits" and plain.gb["stgc"] == 0
    assert stgc.gb["stgc"] > 0 and stgc.total == pytest.approx(plain.total + stgc.gb["stgc"])
    assert plain.gb["act ckpt on"] < plain.gb["act ckpt off"] / 3
