"""moe.py: DeepSpeed-v0.9.5 gating on hand-computed cases, upcycling, loop == grouped dispatch,
MoLE, MoE-LLaVA checkpoint keys both ways, deterministic evaluation."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tiny_hf
from model import GeluMLP, LanguageModel, LlavaModel, LMConfig, SwiGLU, to_hf_state_dict
from moe import (LoRAExperts, LoRALinear, MoEConfig, MoELayer, RoutingRecord, capacity, dispatch_path, is_moe_trainable,
                 is_routed, route)

# ---------------------------------------------------------------------------------------------
# Gating, by hand

# 4 tokens, 3 experts, top-2; logits chosen so the preference orders are:
#   t0: e0 > e1 > e2    t1: e0 > e2 > e1    t2: e0 > e1 > e2    t3: e1 > e0 > e2
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [3.0, 1.0, 0.5], [1.0, 2.0, 0.0]])


def test_capacity_formula():
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5, eval_capacity_factor=2.0)
    assert capacity(100, cfg, training=True) == math.ceil(100 / 4 * 1.5 * 2) == 75
    assert capacity(100, cfg, training=False) == 100                  # eval: nothing can be dropped
    assert capacity(3, MoEConfig(min_capacity=4), training=True) == 4
    assert capacity(10, MoEConfig(dropless=True, capacity_factor=0.1), training=True) == 10


@pytest.mark.parametrize("S,cf,deepspeed", [(100, 1.1, 55), (25, 1.2, 16), (2048, 1.5, 1536)])
def test_capacity_is_deepspeeds_float32_arithmetic(S, cf, deepspeed):
    """DeepSpeed v0.9.5: ceil((S / E) * torch.tensor(cf * 2)) in float32; float64 gives 56 and 15 for the first two."""
    assert capacity(S, MoEConfig(num_experts=4, top_k=2, capacity_factor=cf), training=True) == deepspeed


def test_capacity_equals_deepspeeds_expression_on_a_grid():
    """DeepSpeed v0.9.5 _capacity, written out: torch.ceil((S / E) * torch.tensor(cf * k)) (float32 tensor)."""
    for S in (7, 25, 100, 999, 2048, 12345):
        for cf in (0.3, 1.0, 1.1, 1.2, 1.25, 1.37, 1.5, 2.0):
            for E, k in ((4, 2), (8, 2), (3, 1)):
                ref = int(torch.ceil((S / E) * torch.tensor(cf * k)))
                assert capacity(S, MoEConfig(num_experts=E, top_k=k, capacity_factor=cf), True) == ref, (S, cf, E, k)


def test_first_choice_is_argmax_of_the_probabilities():
    """Logits 1e-8 apart tie after softmax in fp32: DeepSpeed's argmax(gates) keeps the lower index."""
    logits = torch.tensor([[0.0, 1e-8, -3.0, -3.0]])
    assert logits.argmax(-1).item() == 1 and logits.softmax(-1).argmax(-1).item() == 0
    assert route(logits, MoEConfig(num_experts=4, top_k=2), training=True)[0].tolist() == [[0, 1]]


def test_dropping_order_first_choices_before_second():
    # C = ceil(4 / 3 * 0.75 * 2) = 2 slots per expert.
    # First choices, in token order: e0 <- t0 (slot 0), t1 (slot 1), t2 (slot 2: dropped); e1 <- t3 (slot 0).
    # Second choices queue after ALL first choices: e1 <- t0 (slot 1, kept), t2 (slot 2, dropped);
    # e2 <- t1 (slot 0, kept); e0 <- t3 (slot 3, dropped).
    cfg = MoEConfig(num_experts=3, top_k=2, capacity_factor=0.75)
    assert capacity(4, cfg, True) == 2
    experts, w, kept, aux, counts = route(LOGITS, cfg, training=True)
    assert experts.tolist() == [[0, 1], [0, 2], [0, 1], [1, 0]]
    assert kept.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    p = LOGITS.softmax(-1)
    assert torch.allclose(w[0], torch.stack([p[0, 0], p[0, 1]]) / (p[0, 0] + p[0, 1]))   # renormalised
    assert torch.allclose(w[1], torch.stack([p[1, 0], p[1, 2]]) / (p[1, 0] + p[1, 2]))
    assert w[2].tolist() == [0.0, 0.0]                                 # both dropped: no MoE output
    assert w[3].tolist() == [1.0, 0.0]                                 # one survivor takes weight 1
    assert counts.tolist() == [3, 1, 0]                                # first choices, before dropping
    # aux = E * sum_e mean_prob_e * frac_top1_e, with frac from first choices before dropping
    expected_aux = 3 * (p.mean(0) * torch.tensor([3 / 4, 1 / 4, 0.0])).sum()
    assert torch.allclose(aux, expected_aux)


def test_eval_capacity_keeps_every_token():
    cfg = MoEConfig(num_experts=3, top_k=2, capacity_factor=0.75, eval_capacity_factor=2.0)
    *_, kept_eval, _, _ = route(LOGITS, cfg, training=False)
    assert kept_eval.all()


def test_aux_loss_gradient_flows_through_mean_prob_only():
    logits = LOGITS.clone().requires_grad_(True)
    _, _, _, aux, _ = route(logits, MoEConfig(num_experts=3, top_k=2), training=True)
    aux.backward()
    # d aux / d logits = E * d(sum_e mean_prob_e * frac_e): nonzero, and zero if all fractions were equal
    assert logits.grad.abs().sum() > 0


def test_gumbel_second_choice_samples_softmax_over_the_remaining_experts():
    """Gumbel-max: argmax(logits + Gumbel noise) over the experts other than the first choice is a draw from softmax
    over those experts. Every token here prefers expert 0 first, where the NaN-noise bug routed it to 0 twice."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0]).repeat(40000, 1)
    gumbel_cfg = MoEConfig(second_expert="gumbel")
    experts = route(logits, gumbel_cfg, training=True, generator=torch.Generator().manual_seed(1))[0]
    assert (experts[:, 0] == 0).all() and (experts[:, 0] != experts[:, 1]).all()   # never the same expert twice
    freq = torch.bincount(experts[:, 1], minlength=4).float() / len(experts)
    expected = torch.cat([torch.zeros(1), logits[0, 1:].softmax(-1)])
    assert (freq - expected).abs().max() < 0.01, (freq, expected)     # ~4 standard errors at 40k draws
    # evaluation stays deterministic unless asked for the original's behaviour (MoE-LLaVA issue #60)
    top2 = route(logits[:8], MoEConfig(), training=True)[0]
    assert torch.equal(route(logits[:8], gumbel_cfg, training=False)[0], top2)
    eval_bug = MoEConfig(second_expert="gumbel", gumbel_at_eval=True)
    sampled = route(logits[:256], eval_bug, training=False, generator=torch.Generator().manual_seed(2))[0]
    assert (sampled[:, 1] != 1).any() and (sampled[:, 0] != sampled[:, 1]).all()


def test_layer_placement():
    assert MoEConfig(layers="sparse").layer_indices(6) == [0, 2, 4]
    assert MoEConfig(layers="first_half").layer_indices(6) == [0, 1, 2]
    assert MoEConfig(layers="second_half").layer_indices(6) == [3, 4, 5]
    assert MoEConfig(layers="dense").layer_indices(3) == [0, 1, 2]
    assert MoEConfig(layers=[5, 1]).layer_indices(6) == [1, 5]

# ---------------------------------------------------------------------------------------------
# The MoE layer: upcycling, dispatch paths


def dense_mlp(kind, seed=0):
    cfg = LMConfig(hidden_size=32, intermediate_size=48, num_heads=4, num_layers=1, vocab_size=10,
                   mlp="swiglu" if kind == "swiglu" else "gelu", act="silu" if kind == "swiglu" else "gelu_new",
                   mlp_bias=kind == "gelu")
    return tiny_hf.randomize(SwiGLU(cfg) if kind == "swiglu" else GeluMLP(cfg), seed)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_upcycled_moe_equals_dense_ffn_on_kept_tokens(kind):
    dense = dense_mlp(kind)
    moe = MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5), dense).train()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        y, rec = moe(x)
        ref = dense(x).reshape(-1, 32)
    y = y.reshape(-1, 32)
    any_kept = rec.kept.any(dim=1)
    assert 0 < any_kept.sum() < 32                                     # capacity 0.5 drops some tokens entirely
    assert (y[any_kept] - ref[any_kept]).abs().max() < 1e-5            # identical experts, weights sum to 1
    assert y[~any_kept].abs().max() == 0                               # both choices dropped: zero output


def dispatch_pair(kind, dim, impl, capacity_factor=1.0, seed=3):
    """A fast-path layer and a loop layer with the same (distinct, random) experts and router."""
    torch.manual_seed(0)
    cfg = LMConfig(hidden_size=dim, intermediate_size=44 if dim == 30 else 48, num_heads=2, num_layers=1,
                   vocab_size=10, mlp=kind, act="silu" if kind == "swiglu" else "gelu_new", mlp_bias=kind == "gelu")
    dense = tiny_hf.randomize(SwiGLU(cfg) if kind == "swiglu" else GeluMLP(cfg))
    fast = MoELayer(MoEConfig(num_experts=4, capacity_factor=capacity_factor, impl=impl), dense).train()
    tiny_hf.randomize(fast, seed=seed)                                 # distinct experts and router
    loop = MoELayer(MoEConfig(num_experts=4, capacity_factor=capacity_factor, impl="loop"), dense).train()
    loop.load_state_dict(fast.state_dict())
    return fast, loop


def outputs_and_grads(layer, x):
    xi = x.clone().requires_grad_(True)
    y, rec = layer(xi)
    (y.float().pow(2).sum() + rec.aux_loss).backward()
    return y, [xi.grad] + [p.grad for p in layer.parameters()], rec


@pytest.mark.parametrize("kind,dim,impl", [("swiglu", 32, "grouped"), ("gelu", 32, "grouped"), ("swiglu", 32, "padded"),
                                           ("gelu", 32, "padded"), ("swiglu", 30, "padded")])   # 30: unaligned rows
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5])
def test_fast_dispatch_paths_equal_the_loop(kind, dim, impl, capacity_factor):
    fast, loop = dispatch_pair(kind, dim, impl, capacity_factor)
    x = torch.randn(3, 10, dim)
    (y_fast, g_fast, rec), (y_loop, g_loop, _) = outputs_and_grads(fast, x), outputs_and_grads(loop, x)
    assert not rec.kept.all()                                          # some drops, to test them too
    assert (y_fast - y_loop).abs().max() < 1e-5
    for a, b in zip(g_fast, g_loop):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("impl", ["grouped", "padded"])
def test_fast_dispatch_with_an_expert_that_gets_no_token(impl):
    fast, loop = dispatch_pair("swiglu", 32, impl)
    with torch.no_grad():
        for layer in (fast, loop):
            layer.router.weight[2] = -10.0                             # x > 0: expert 2 never wins
    x = torch.randn(2, 8, 32).abs()
    (y_fast, g_fast, rec), (y_loop, g_loop, _) = outputs_and_grads(fast, x), outputs_and_grads(loop, x)
    assert not (rec.experts == 2).any()
    assert (y_fast - y_loop).abs().max() < 1e-5
    for a, b in zip(g_fast, g_loop):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("impl", ["grouped", "padded"])
def test_fast_dispatch_under_bf16_autocast_matches_the_loop(impl):
    """train.py's setting (fp32 master weights, bf16 autocast): the fast paths cast explicitly to bf16 (checked
    by tests/test_cuda_semantics.py's dispatch spy) and agree with the autocast loop to bf16 rounding."""
    fast, loop = dispatch_pair("swiglu", 32, impl)
    x = torch.randn(3, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y_fast, g_fast, _), (y_loop, g_loop, _) = outputs_and_grads(fast, x), outputs_and_grads(loop, x)
    assert y_fast.dtype == y_loop.dtype == torch.float32               # cast back to the input's dtype
    assert (y_fast - y_loop).abs().max() < 2e-2 * y_loop.abs().max()
    for a, b in zip(g_fast, g_loop):
        assert a.dtype == b.dtype == torch.float32                     # fp32 master gradients
        assert (a - b).abs().max() < 3e-2 * max(1e-3, b.abs().max().item())


def test_dispatch_rule():
    """One rule (moe.dispatch_path): _grouped_mm where it is fast and allowed, the capacity-padded bmm elsewhere."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dispatch_path(cpu, torch.float32, True) == dispatch_path(cpu, torch.bfloat16, True) == "grouped"
    assert dispatch_path(cpu, torch.float32, False) == "loop"          # rows not 16-byte aligned: syncs are free
    assert dispatch_path(cuda, torch.float32, True) == "padded"        # CUDA's _grouped_mm refuses fp32
    import moe
    for capability, path in (((8, 0), "padded"), ((9, 0), "grouped"), ((10, 0), "grouped")):
        moe.cuda_capability, saved = (lambda device: capability), moe.cuda_capability
        try:
            assert dispatch_path(cuda, torch.bfloat16, True) == path   # sm80: grouped_mm would sync per group
            assert dispatch_path(cuda, torch.bfloat16, False) == "padded"
        finally:
            moe.cuda_capability = saved

# ---------------------------------------------------------------------------------------------
# The MoE inside the language model


def moe_lm(kind="ffn", num_experts=4, **kw):
    cfg = LMConfig.from_hf(tiny_hf.lm_configs()["stablelm2"].to_dict())
    lm = tiny_hf.randomize(LanguageModel(cfg)).eval()
    dense_logits = lm(input_ids=tiny_hf_ids()).logits
    return lm, dense_logits, lm.install_moe(MoEConfig(kind=kind, num_experts=num_experts, **kw))


def tiny_hf_ids():
    return torch.randint(0, tiny_hf.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def test_upcycled_language_model_equals_dense_at_eval():
    _, dense_logits, lm = moe_lm()
    out = lm(input_ids=tiny_hf_ids())
    assert len(out.routing) == 1 and out.routing[0].layer == 0        # 2 layers, 'sparse' -> layer 0
    assert (out.logits - dense_logits).abs().max() < 1e-5
    assert torch.allclose(out.aux_loss, out.routing[0].aux_loss)
    assert out.routing[0].router_logits.dtype == torch.float32


def test_evaluation_routing_is_deterministic():
    _, _, lm = moe_lm(second_expert="gumbel")                          # even with the original's sampler set
    for p in lm.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    a, b = lm(input_ids=tiny_hf_ids()), lm(input_ids=tiny_hf_ids())
    assert torch.equal(a.routing[0].experts, b.routing[0].experts) and torch.equal(a.logits, b.logits)


def test_mole_starts_as_the_base_model_and_trains_only_adapters_and_routers():
    lm0, dense_logits, lm = moe_lm(kind="lora", num_experts=3, top_k=1, layers="dense", lora_rank=4, attn_lora_rank=2)
    out = lm(input_ids=tiny_hf_ids())
    assert (out.logits - dense_logits).abs().max() < 1e-5
    assert len(out.routing) == 2 and (out.routing[0].experts.shape[1] == 1)          # top-1 (MoLE)
    for name, p in lm.named_parameters():
        p.requires_grad_(is_moe_trainable(name, "lora"))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".router." in n for n in trainable)
    assert any(".attn.q_proj.lora_A" in n for n in trainable)
    # the router learns through the gate probability that scales the LoRA deltas
    for mod in lm.modules():
        if isinstance(mod, LoRAExperts):
            for b in mod.lora_B.values():
                b.data.normal_(0, 0.1)
    lm.train()
    lm(input_ids=tiny_hf_ids()).logits.sum().backward()
    assert lm.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_lora_experts_forward_equals_each_tokens_own_expert():
    """The batched MoLE forward against its per-expert definition (expert_apply, the function STGC differentiates):
    token n through the frozen MLP plus its chosen expert's deltas scaled by its gate probability."""
    cfg = LMConfig(hidden_size=32, intermediate_size=48, num_heads=2, num_layers=1, vocab_size=10)
    torch.manual_seed(0)
    layer = LoRAExperts(MoEConfig(kind="lora", num_experts=3, top_k=1, lora_rank=4, lora_dropout=0.0),
                        tiny_hf.randomize(SwiGLU(cfg))).eval()
    with torch.no_grad():
        for p in list(layer.lora_B.values()) + list(layer.lora_A.values()):
            p.normal_()                                                # B != 0: the experts differ
    x = torch.randn(2, 5, 32)
    y, rec = layer(x)
    x_SD, expert_S, gate_S = x.reshape(-1, 32), rec.experts[:, 0], rec.weights[:, 0]
    assert len(set(expert_S.tolist())) > 1
    ref = torch.cat([layer.expert_apply(layer.expert_params(int(e)), x_SD[n:n + 1], gate_S[n:n + 1])
                     for n, e in enumerate(expert_S)])
    assert (y.reshape(-1, 32) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_plain_lora_baseline_has_no_router():
    _, dense_logits, lm = moe_lm(kind="lora", num_experts=1, top_k=1, layers="dense", lora_rank=4)
    out = lm(input_ids=tiny_hf_ids())
    assert out.routing == [] and (out.logits - dense_logits).abs().max() < 1e-5
    assert all(getattr(b.mlp, "router", None) is None for b in lm.layers)
    # built from LoRALinear on the MLP projections; not a routed layer, unlike every MoE / MoLE layer
    assert all(isinstance(b.mlp.gate_proj, LoRALinear) and not is_routed(b.mlp) for b in lm.layers)


def test_every_routed_layer_returns_its_routing_record():
    x = torch.randn(2, 5, 64)
    for kind, n, k in (("ffn", 4, 2), ("lora", 3, 1)):
        _, _, lm = moe_lm(kind=kind, num_experts=n, top_k=k, lora_rank=4)
        layer = next(b.mlp for b in lm.layers if is_routed(b.mlp))
        y, record = layer(x[..., :layer.router.in_features])
        assert isinstance(record, RoutingRecord) and record.module is layer and record.output is y
        assert record.router_logits.shape == (10, n) and record.experts.shape == record.kept.shape == (10, k)


def test_plain_lora_checkpoints_of_the_old_layout_still_load(tmp_path):
    """Before issue 17 plain LoRA was a one-expert LoRAExperts: mlp.base.<proj>.weight, mlp.lora_A.<proj> [1, r, in].
    model.plain_lora_v1 maps that layout onto the LoRALinear one; the logits are the same."""
    from model import LlavaConfig, VisionConfig
    from safetensors.torch import load_file
    cfg = LlavaConfig(vision=VisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
                                          num_heads=2), lm=LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                    num_layers=2, num_heads=2))
    torch.manual_seed(0)
    model = LlavaModel(cfg)
    model.lm.install_moe(MoEConfig(kind="lora", num_experts=1, top_k=1, layers="dense", lora_rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.eval().save_pretrained(str(tmp_path / "new"))
    old = {}
    for k, v in load_file(str(tmp_path / "new" / "model.safetensors")).items():
        m = re.fullmatch(r"(lm\.layers\.\d+\.mlp)\.(\w+)\.(base\.weight|base\.bias|lora_A|lora_B)", k)
        if m is None:
            old[k] = v
        elif m[3].startswith("base"):
            old[f"{m[1]}.base.{m[2]}.{m[3][5:]}"] = v
        else:
            old[f"{m[1]}.{m[3]}.{m[2]}"] = v[None].contiguous()
    assert any(".mlp.lora_A.gate_proj" in k for k in old)
    os.makedirs(tmp_path / "old")
    save_file(old, str(tmp_path / "old" / "model.safetensors"))
    json.dump(json.load(open(tmp_path / "new" / "config.json")), open(tmp_path / "old" / "config.json", "w"))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    a, b = LlavaModel.from_pretrained(str(tmp_path / "new")), LlavaModel.from_pretrained(str(tmp_path / "old"))
    assert torch.equal(a.lm(input_ids=ids).logits, b.lm(input_ids=ids).logits)

# ---------------------------------------------------------------------------------------------
# MoE-LLaVA checkpoints (stage III): keys in, keys out


def moe_llava_checkpoint(tmp_path, family):
    """A tiny MoE-LLaVA stage-III dir: MoE layers at 0 (of 2), 4 distinct experts, router wg, projector,
    and the saved (ignored) vision tower; Phi without lm_head.bias, Qwen-1 under transformer."""
    tower = tiny_hf.hf_vision("clip", seed=1)
    tower_dir = str(tmp_path / "clip")
    tower.save_pretrained(tower_dir)
    g = torch.Generator().manual_seed(5)
    if family == "qwen":
        cfg, sd, root, layer = dict(tiny_hf.QWEN1_CONFIG), tiny_hf.qwen1_state_dict(), "transformer", "transformer.h.0."
    else:
        hf_cfg = tiny_hf.lm_configs()["stablelm2" if family == "stablelm" else "phi2"]
        cfg, sd, root, layer = hf_cfg.to_dict(), tiny_hf.hf_causal_lm(hf_cfg).state_dict(), "model", "model.layers.0."
        sd.pop("lm_head.bias", None)                                  # MoE-LLaVA's Phi has no lm_head.bias
    for k in [k for k in sd if k.startswith(layer + "mlp.")]:
        t = sd.pop(k)
        for e in range(4):
            sd[k.replace("mlp.", f"mlp.deepspeed_moe.experts.deepspeed_experts.{e}.")] = t + 0.05 * torch.randn(t.shape, generator=g)
    sd[layer + "mlp.deepspeed_moe.gate.wg.weight"] = torch.randn(4, 64, generator=g)
    sd |= {f"{root}.mm_projector.image_spatial_proj.{i}.{wb}": torch.randn(*((64, 48 if i == 0 else 64) if wb == "weight" else (64,)), generator=g)
           for i in (0, 2) for wb in ("weight", "bias")}
    sd |= {f"{root}.image_tower.image_tower.vision_model.{k}": v for k, v in tower.state_dict().items()}
    cfg |= {"model_type": f"moe_llava_{family}", "mm_hidden_size": 48, "mm_vision_select_layer": -2,
            "image_projector_type": "mlp2x_gelu", "mm_image_tower": "openai/clip-vit-large-patch14-336",
            "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [0], "ep_size": 1, "top_k_experts": 2,
                    "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0, "use_residual": False,
                    "router_aux_loss_coef": 0.01, "num_experts": [4]}}
    path = str(tmp_path / f"moe_llava_{family}")
    os.makedirs(path)
    json.dump(cfg, open(f"{path}/config.json", "w"))
    save_file({k: v.contiguous() for k, v in sd.items()}, f"{path}/model.safetensors")
    return path, tower_dir, sd


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_moe_llava_checkpoint_round_trip(family, tmp_path):
    path, tower_dir, sd = moe_llava_checkpoint(tmp_path, family)
    model = LlavaModel.from_pretrained(path, vision_tower=tower_dir)
    moe = model.lm.layers[0].mlp
    assert isinstance(moe, MoELayer) and model.lm.cfg.moe.capacity_factor == 1.5
    assert moe.router.weight.dtype == torch.float32
    layer = "transformer.h.0." if family == "qwen" else "model.layers.0."
    up = {"stablelm": "up_proj", "phi": "fc1", "qwen": "up_proj"}[family]
    hf_up = {"stablelm": "up_proj", "phi": "fc1", "qwen": "w1"}[family]
    assert torch.equal(getattr(moe.experts, up).weight[2], sd[f"{layer}mlp.deepspeed_moe.experts.deepspeed_experts.2.{hf_up}.weight"])
    exported = to_hf_state_dict(model)
    original = {k: v for k, v in sd.items() if ".image_tower." not in k}
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # and it runs, with routing recorded
    out = model(torch.tensor([[3, -200, 5, 6]]), torch.randn(1, 3, 28, 28))
    assert out.routing[0].experts.shape == (1 * (3 + 16), 2)


def test_moe_checkpoint_with_wrong_expert_count_is_named(tmp_path):
    path, tower_dir, _ = moe_llava_checkpoint(tmp_path, "stablelm")
    cfg = json.load(open(f"{path}/config.json"))
    cfg["moe"]["num_experts"] = [3]
    json.dump(cfg, open(f"{path}/config.json", "w"))
    # whichever tensor is met first names the problem: the router's [4, D] shape or the 4th expert
    with pytest.raises((KeyError, ValueError), match=r"(gate\.wg\.weight.*\(4, 64\).*\(3, 64\))|(needs experts 0..2, checkpoint has \[0, 1, 2, 3\])"):
        LlavaModel.from_pretrained(path, vision_tower=tower_dir)
