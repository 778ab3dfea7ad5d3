"""CUDA's rules, checked from a CPU (issue: the main job must run where it is used).

1. Fake CUDA forwards. Under `FakeTensorMode(shape_env=ShapeEnv())` with `torch.device("cuda")` a module runs on
   fake CUDA tensors without a GPU: every op goes through its meta kernel, which applies CUDA's dtype rules
   (`torch._grouped_mm` refuses fp32 operands there), and a CPU tensor mixed into CUDA work is an error. We run
   every LM family with MoE (ffn top-2) and MoLE (LoRA experts + attention LoRA), right-padded training forwards
   with labels, the KV-cached prefill and one decoding step, the vision tower + projector, and STGC's forward
   bookkeeping (conflicts from the 'bias' source, CEL, its closed-form logit gradient, the step totals train.py
   sums), in bf16 and fp32 weights,
   and the grouped path as on sm90 and the padded one as on sm80.
   What fake tensors cannot do: a backward (the autograd engine asks for a CUDA context), autocast (it cannot be
   enabled without CUDA), and anything that reads values on the host: LlavaModel's splice (it counts and finds
   the <image> placeholders on the host, once per sample), generate's stop test, STGC's 'full' source (its
   per-expert token lists) and the logged statistics. Those are covered by the CPU tests and by the real-CUDA
   tests of bench/gpu_suite (tests/test_cuda.py).
2. The performance contract under train.py's setting (fp32 master weights, bf16 autocast), on CPU autocast: a
   dispatch spy records every matmul's operand dtypes in a forward and backward, and every matmul that touches
   the FFN width (experts, MoLE's LoRA experts) must run in bf16; only the router stays fp32.
3. FSDP2's bf16 MixedPrecisionPolicy leaves the routers fp32 (train.apply_fsdp), in a one-process gloo group.
"""
import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode

import moe
import tiny_hf
from model import KVCache, LanguageModel, LlavaModel, LlavaConfig, LMConfig, VisionConfig
from moe import LoRAExperts, MoEConfig, MoELayer
from stgc import STGCConfig, cel_logit_grad, conflict_elimination_loss, find_conflicts

FAMILIES = list(tiny_hf.lm_configs()) + ["qwen1"]


def lm_config(family, kind):
    if family == "qwen1":                                              # no transformers class: written out
        cfg = LMConfig(family="qwen", vocab_size=tiny_hf.VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, norm="rmsnorm", qkv_bias=True)
    else:
        cfg = LMConfig.from_hf(tiny_hf.lm_configs()[family].to_dict())
    cfg.moe = (MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, layers=[0, 1]) if kind == "ffn" else
               MoEConfig(kind="lora", num_experts=3, top_k=1, layers="dense", lora_rank=8, attn_lora_rank=8,
                         mole_router_bias=True, mole_mixture="soft", mole_balance="released"))   # as released
    return cfg


@contextmanager
def fake_cuda(capability=(9, 0)):
    """Fake CUDA tensors, as if on a GPU of this compute capability (moe.dispatch_path reads it)."""
    saved = moe.cuda_capability
    moe.cuda_capability = lambda device: capability
    try:
        with FakeTensorMode(shape_env=ShapeEnv()), torch.device("cuda"):
            yield
    finally:
        moe.cuda_capability = saved


def build(make, dtype):
    """Build in `dtype` (fake tensors cannot be converted with .to(): module._apply swaps them); the routers
    are built fp32 explicitly, as loading keeps them (moe.routers_to_fp32)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make()
    finally:
        torch.set_default_dtype(saved)


def padded_batch(B=2, T=12, vocab=tiny_hf.VOCAB):
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 4:] = 0                                                # right padding, as in training
    labels = torch.where(mask.bool(), ids, -100)
    return ids, mask, labels


def paths_taken(lm, x_dtype):
    return {layer.path(torch.empty(0, lm.cfg.hidden_size, dtype=x_dtype)) for layer in lm.modules()
            if isinstance(layer, MoELayer)}


# -----------------------------------------------------------------------------
# 1. Fake CUDA forwards

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["ffn", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fake_cuda_training_forward_every_family(family, kind, dtype):
    with fake_cuda():
        lm = build(lambda: LanguageModel(lm_config(family, kind)), dtype).train()
        ids, mask, labels = padded_batch()
        out = lm(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.loss.device.type == "cuda" and out.loss.dtype == torch.float32
        assert len(out.routing) == 2 and all(r.router_logits.dtype == torch.float32 for r in out.routing)
        logits = lm(input_ids=ids, attention_mask=mask).logits        # [B, T, V]
        assert logits.shape == (2, 12, lm.cfg.vocab_size) and logits.dtype == dtype
        if kind == "ffn":                                              # the rule: grouped_mm only in bf16 on sm90+
            assert paths_taken(lm, dtype) == {"grouped" if dtype == torch.bfloat16 else "padded"}


@pytest.mark.parametrize("impl", ["grouped", "padded"])
def test_fake_cuda_refuses_fp32_grouped_mm_and_the_rule_avoids_it(impl):
    """Why the rule exists: CUDA's _grouped_mm refuses fp32 (the old fast path handed it fp32 under autocast);
    the padded bmm accepts any dtype."""
    with fake_cuda():
        lm = build(lambda: LanguageModel(lm_config("stablelm2", "ffn")), torch.float32)
        for layer in lm.modules():
            if isinstance(layer, MoELayer):
                layer.cfg.impl = impl
        ids, mask, _ = padded_batch()
        if impl == "grouped":
            with pytest.raises(RuntimeError, match="BFloat16"):
                lm(input_ids=ids, attention_mask=mask)
        else:
            assert lm(input_ids=ids, attention_mask=mask).logits.device.type == "cuda"


def test_fake_cuda_sm80_takes_the_padded_path():
    with fake_cuda(capability=(8, 0)):
        lm = build(lambda: LanguageModel(lm_config("llama_gqa_llama3rope", "ffn")), torch.bfloat16)
        assert paths_taken(lm, torch.bfloat16) == {"padded"}
        ids, mask, labels = padded_batch()
        assert lm(input_ids=ids, attention_mask=mask, labels=labels).loss.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", ["stablelm2", "phi2", "mistral_window3", "qwen1"])
def test_fake_cuda_kv_cache_prefill_and_one_decoding_step(family, dtype):
    """generate's device work: left-padded prefill into the KV cache, then one token (its host-side stop test and
    .tolist() are the only parts left out)."""
    with fake_cuda():
        lm = build(lambda: LanguageModel(lm_config(family, "ffn")), dtype).eval()
        ids = torch.randint(0, lm.cfg.vocab_size, (2, 7))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[0, :3] = 0                                                # left padding, as generate pads
        cache = KVCache(lm.cfg, 2, 9, dtype, "cuda")
        with torch.no_grad():
            h, _ = lm.hidden_states(input_ids=ids, attention_mask=mask, kv_cache=cache)
            next_tok = lm.lm_head(h[:, -1]).argmax(-1)                 # [B]
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            h, routing = lm.hidden_states(input_ids=next_tok[:, None], attention_mask=mask, kv_cache=cache)
        assert cache.length == 8 and h.shape == (2, 1, lm.cfg.hidden_size) and h.device.type == "cuda"
        assert len(routing) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_fake_cuda_llava_images_through_tower_projector_and_moe_lm(kind, dtype):
    """LlavaModel's device work with images: tower, projector, the spliced sequence through the MoE LM with
    labels. The splice's placeholder bookkeeping reads the ids on the host, so here the image features are
    placed at a known position (as splice places them: after the prompt's first token) instead."""
    vision = VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    with fake_cuda():
        model = build(lambda: LlavaModel(LlavaConfig(vision=vision, lm=lm_config("stablelm2", kind))), dtype).train()
        feats = model.encode_images(torch.randn(2, 3, 28, 28))        # [N, P, D]
        assert feats.shape == (2, vision.num_features, model.cfg.lm.hidden_size) and feats.dtype == dtype
        ids, mask, labels = padded_batch()
        text = model.lm.embed_tokens(ids)                              # [B, T, D]
        embeds = torch.cat([text[:, :1], feats.to(text.dtype), text[:, 1:]], dim=1)
        P = feats.shape[1]
        mask = torch.cat([mask[:, :1], mask.new_ones(2, P), mask[:, 1:]], dim=1)
        labels = torch.cat([labels[:, :1], labels.new_full((2, P), -100), labels[:, 1:]], dim=1)
        out = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        assert out.loss.device.type == "cuda" and out.routing[0].router_logits.shape[0] == 2 * (12 + P)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_fake_cuda_stgc_forward_bookkeeping(kind, dtype):
    """What STGC's fast path does in the backward hook, fed a fake CUDA output gradient: conflicts from the
    'bias' source, the CEL and its closed-form gradient at the router logits, all on the device, fp32."""
    with fake_cuda():
        lm = build(lambda: LanguageModel(lm_config("stablelm2", kind)), dtype).train()
        ids, mask, labels = padded_batch()
        out = lm(input_ids=ids, attention_mask=mask, labels=labels)
        for record in out.routing:
            delta = torch.randn_like(record.output)                    # what the hook receives, [B, T, D]
            c = find_conflicts(record, delta.reshape(-1, delta.shape[-1]), STGCConfig(enabled=True))
            cel = conflict_elimination_loss(record.router_logits.detach(), c)
            g = cel_logit_grad(record.router_logits.detach(), c)
            assert c.cos.device.type == cel.device.type == g.device.type == "cuda"
            assert c.cos.dtype == cel.dtype == g.dtype == torch.float32
            assert g.shape == record.router_logits.shape
            c.cel = cel
            E = record.router_logits.shape[1]
            totals = c.totals(E)                                       # what train.py sums over a step's micro-batches
            assert totals.device.type == "cuda" and totals.shape == (4 + 2 * E,)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fake_cuda_router_objectives_measurements_and_expert_bias(dtype):
    """The routing laboratory's device work (tests/test_routing.py has the values): z-loss, sequence aux, the
    per-layer sums train.py logs, the per-kind conflict totals, and the aux-loss-free bias, which is built fp32 on the
    device whatever the model's dtype, chooses experts on the device and is updated there in fp32."""
    from dataclasses import replace
    from moe import sequence_aux_loss, update_expert_bias, z_loss
    from routing import assignment_load, layer_sums, sums_width
    cfg = lm_config("stablelm2", "ffn")
    cfg.moe = replace(cfg.moe, expert_bias=True)
    with fake_cuda():
        lm = build(lambda: LanguageModel(cfg), dtype).train()
        ids, mask, labels = padded_batch()
        out = lm(input_ids=ids, attention_mask=mask, labels=labels)
        E = cfg.moe.num_experts
        for r in out.routing:
            assert r.module.expert_bias.device.type == "cuda" and r.module.expert_bias.dtype == torch.float32
            terms = [z_loss(r), sequence_aux_loss(r), layer_sums(r), assignment_load(r)]
            assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in terms)
            assert terms[2].shape == (sums_width(E),)
            delta = torch.randn_like(r.output)
            c = find_conflicts(r, delta.reshape(-1, delta.shape[-1]), STGCConfig(enabled=True))
            kinds = torch.zeros(r.router_logits.shape[0], dtype=torch.long)    # [S] on the (fake) device
            kt = c.kind_totals(kinds)
            assert kt.device.type == "cuda" and kt.shape == (9,)
            update_expert_bias(r.module, terms[3])
            assert r.module.expert_bias.device.type == "cuda" and r.module.expert_bias.dtype == torch.float32

# -----------------------------------------------------------------------------
# 2. The dispatch spy: experts compute in bf16 under autocast with fp32 master weights

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten._grouped_mm.default, torch.ops.aten.baddbmm.default}


class MatmulSpy(TorchDispatchMode):
    """Records (op name, operand dtypes, operand shapes) of every matmul that reaches the kernels."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            ts = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]   # not offs
            self.calls.append((func.__name__, tuple(t.dtype for t in ts), tuple(tuple(t.shape) for t in ts)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,impl", [("ffn", "fast"), ("ffn", "grouped"), ("ffn", "padded"), ("ffn", "loop"),
                                       ("lora", "fast")])
def test_under_bf16_autocast_expert_matmuls_run_in_bf16(kind, impl):
    cfg = lm_config("stablelm2", kind)
    cfg.moe.impl = impl
    F_ = cfg.intermediate_size                                         # 96: only FFN / expert matmuls have it
    torch.manual_seed(0)
    lm = tiny_hf.randomize(LanguageModel(cfg)).train()                 # fp32 master weights
    ids, mask, labels = padded_batch()
    spy = MatmulSpy()
    with spy:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm(input_ids=ids, attention_mask=mask, labels=labels)
        (out.loss + 0.01 * out.aux_loss).backward()                    # outside autocast, as train.py does
    ffn = [c for c in spy.calls if any(F_ in s for s in c[2])]
    assert ffn, "no FFN matmul recorded: the spy is not seeing the experts"
    wrong = [c for c in ffn if any(d != torch.bfloat16 for d in c[1])]
    assert not wrong, f"expert matmuls outside bf16: {wrong[:3]}"
    if kind == "ffn" and impl in ("fast", "grouped"):
        assert any(name.startswith("_grouped_mm") for name, *_ in ffn)
    S, D, E = ids.numel(), cfg.hidden_size, cfg.moe.num_experts     # the router: [S, D] x [D, E] and its two grads
    routers = [c for c in spy.calls if c[0] in ("mm.default", "addmm.default") and E in sum(c[2], ())   # addmm: a router bias
               and set(sum(c[2], ())) <= {S, D, E}]
    assert len(routers) >= 3 * 2 and all(d == torch.float32 for c in routers for d in c[1]), routers   # fwd + 2 grads
    for p in lm.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)

# -----------------------------------------------------------------------------
# 3. FSDP2's bf16 policy keeps the routers fp32


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_bf16_policy_keeps_routers_fp32(one_process_group):
    import train
    vision = VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = LlavaModel(LlavaConfig(vision=vision, lm=lm_config("stablelm2", "ffn"))).train()
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            m.router.register_forward_hook(lambda mod, inp, out, name=name: seen.update({name + ".router": (mod.weight.dtype, out.dtype)}))
    train.apply_fsdp(model, bf16=True)
    for name, m in model.named_modules():                              # the expert weights are gathered in bf16
        if isinstance(m, MoELayer):
            m.register_forward_pre_hook(lambda mod, inp, name=name: seen.update({name + ".experts": mod.experts.gate_proj.weight.dtype}))
    ids, mask, labels = padded_batch()
    out = model(ids, None, labels=labels, attention_mask=mask)        # through the root, as train.py calls it
    out.loss.backward()
    routers = {k: v for k, v in seen.items() if k.endswith(".router")}
    experts = {k: v for k, v in seen.items() if k.endswith(".experts")}
    assert len(routers) == 2 and all(v == (torch.float32, torch.float32) for v in routers.values()), routers
    assert len(experts) == 2 and all(v == torch.bfloat16 for v in experts.values()), experts
