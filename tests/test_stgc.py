"""stgc.py: per-token gradients against naive autograd, factorised cosines against materialised ones,
fast (one backward) against reference (two passes), a hand-made conflict, padding, beta = 0."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import tiny_hf
from model import LanguageModel, LMConfig
from moe import LoRAExperts, MoEConfig, MoELayer, RoutingRecord
from stgc import (STGC, STGCConfig, cel_logit_grad, conflict_elimination_loss, factorised_full_cos, find_conflicts,
                  per_token_grads)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import stgc_agreement  # noqa: E402  (the one-step STGC objective, shared with bench/stgc_agreement.py)

ALPHA = stgc_agreement.ALPHA


def tiny_moe_lm(kind="ffn", top_k=2, family="stablelm2", moe_layers=(1,), seed=0):
    """Two-layer decoder, one MoE layer with distinct random experts (not just upcycled copies)."""
    cfg = LMConfig.from_hf(tiny_hf.lm_configs()[family].to_dict())
    torch.manual_seed(seed)
    lm = LanguageModel(cfg).install_moe(MoEConfig(kind=kind, num_experts=4 if kind == "ffn" else 3, top_k=top_k,
                                                  capacity_factor=1.0, layers=list(moe_layers), lora_rank=4,
                                                  lora_dropout=0.0))
    tiny_hf.randomize(lm, seed)
    return lm.train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tiny_hf.VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0                                                    # right padding
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100                                               # an unsupervised prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def moe_layer(lm):
    return next(m for m in lm.modules() if isinstance(m, (MoELayer, LoRAExperts)))


@pytest.mark.parametrize("kind,family", [("ffn", "stablelm2"), ("ffn", "phi2"), ("lora", "stablelm2")])
def test_func_per_token_grads_equal_naive_autograd_loop(kind, family):
    lm = tiny_moe_lm(kind, top_k=1 if kind == "lora" else 2, family=family)
    layer = moe_layer(lm)
    x, u, gate = torch.randn(5, 64), torch.randn(5, 64), torch.rand(5)
    fast = per_token_grads(layer, 1, x, u, gate)                        # [5, P]
    params = layer.expert_params(1)
    for n in range(5):                                                 # one autograd call per token
        out = layer.expert_apply(params, x[n:n + 1], gate[n:n + 1])
        grads = torch.autograd.grad((u[n] * out[0]).sum(), list(params.values()))
        naive = torch.cat([g.reshape(-1) for g in grads])
        assert (fast[n] - naive).abs().max() < 1e-5


@pytest.mark.parametrize("kind,family", [("ffn", "stablelm2"), ("ffn", "phi2"), ("lora", "stablelm2")])
def test_factorised_full_cosines_equal_materialised(kind, family):
    lm = tiny_moe_lm(kind, top_k=1 if kind == "lora" else 2, family=family)
    layer = moe_layer(lm)
    x, u, gate = torch.randn(7, 64), torch.randn(7, 64), torch.rand(7)
    g = per_token_grads(layer, 2, x, u, gate)
    ref = torch.nn.functional.cosine_similarity(g, g.mean(0, keepdim=True), dim=-1)
    cos, norm2 = factorised_full_cos(layer, 2, x, u, gate, "rank")
    assert (cos - ref).abs().max() < 1e-5
    assert torch.allclose(norm2, (g * g).sum(-1), rtol=1e-4)


def test_lora_expert_function_matches_the_layer_forward():
    lm = tiny_moe_lm("lora", top_k=1)
    layer = moe_layer(lm)
    for b in layer.lora_B.values():
        b.data.normal_(0, 0.1)
    x = torch.randn(2, 6, 64)
    y, rec = layer(x)
    e, p = rec.experts[:, 0], rec.weights[:, 0]
    for n in range(12):
        ref = layer.expert_apply(layer.expert_params(int(e[n])), x.reshape(-1, 64)[n:n + 1], p[n:n + 1])
        assert (y.reshape(-1, 64)[n] - ref[0]).abs().max() < 1e-5


def run(lm, cfg: STGCConfig, b):
    """One training step's gradients with STGC (fast or reference); returns (grads, conflicts, stgc)."""
    stgc = stgc_agreement.stgc_step(lm, b, cfg)                        # LM + ALPHA * aux + beta * CEL
    return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}, stgc.conflicts, stgc


@pytest.mark.parametrize("source", ["bias", "full"])
@pytest.mark.parametrize("kind,top_k", [("ffn", 2), ("ffn", 1), ("lora", 1)])
def test_fast_equals_reference(kind, top_k, source):
    # At random init gradients within an expert mostly agree (few cos < 0); tau = 0.3 flags enough pairs.
    lm, b = tiny_moe_lm(kind, top_k), batch()
    cfg = dict(enabled=True, grad_source=source, loss_weight=0.5, threshold=0.3)
    g_ref, c_ref, _ = run(lm, STGCConfig(impl="reference", **cfg), b)
    g_fast, c_fast, stgc = run(lm, STGCConfig(impl="fast", **cfg), b)
    assert c_ref[0].conflict.sum() > 0                                 # something to eliminate
    assert torch.equal(c_ref[0].conflict, c_fast[0].conflict) and torch.equal(c_ref[0].pair, c_fast[0].pair)
    assert (c_ref[0].cos - c_fast[0].cos).abs().max() < 1e-5
    assert abs(float(c_ref[0].cel) - float(c_fast[0].cel)) < 1e-5
    assert g_ref.keys() == g_fast.keys()
    for n in g_ref:
        assert (g_ref[n] - g_fast[n]).abs().max() < 1e-5, n
    s = stgc.stats(4 if kind == "ffn" else 3)[0]
    assert 0 < s["conflict_ratio"] < 1 and s["pairs"] == int(c_fast[0].pair.sum()) and s["cel"] > 0


def test_cel_changes_only_the_router_gradient():
    lm, b = tiny_moe_lm(), batch()
    plain, _, _ = run(lm, STGCConfig(enabled=True, loss_weight=0.0, threshold=0.3), b)
    with_cel, conflicts, _ = run(lm, STGCConfig(enabled=True, loss_weight=1.0, threshold=0.3), b)
    assert conflicts[0].conflict.any()
    router = next(n for n in plain if n.endswith("router.weight"))
    assert not torch.equal(plain[router], with_cel[router])
    assert not torch.equal(plain["layers.0.mlp.up_proj.weight"], with_cel["layers.0.mlp.up_proj.weight"])
    # the router's input comes from layer 0: its gradient changes too (the CEL flows upstream like the aux loss);
    # the expert weights of the MoE layer itself do not (the CEL depends on them only through the detached mask)
    for n in plain:
        if ".mlp.experts." in n:
            assert torch.equal(plain[n], with_cel[n]), n


def test_beta_zero_gives_plain_moe_gradients_exactly():
    lm, b = tiny_moe_lm(moe_layers=(0, 1)), batch()
    lm.zero_grad()
    out = lm(**b)
    (out.loss + ALPHA * out.aux_loss).backward()
    plain = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    stgc_grads, conflicts, _ = run(lm, STGCConfig(enabled=True, loss_weight=0.0, grad_source="full"), b)
    assert all(torch.equal(plain[n], stgc_grads[n]) for n in plain)
    assert len(conflicts) == 2



@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_fast_hooks_free_the_step_graph(kind):
    """The hooks sit on the MoE outputs; if they held their routing record strongly, each step's graph would
    be a reference cycle through autograd that GC cannot break, and training would leak every step."""
    import weakref
    lm, b = tiny_moe_lm(kind, top_k=2 if kind == "ffn" else 1, moe_layers=(0, 1)), batch()
    out = lm(**b)
    stgc = STGC(STGCConfig(enabled=True))
    stgc.attach(out.routing)
    (out.loss + ALPHA * out.aux_loss).backward()
    assert len(stgc.stats(4)) == 2
    outputs = [weakref.ref(r.output) for r in out.routing]
    del out
    assert all(ref() is None for ref in outputs)                       # freed by reference counting alone

# ---------------------------------------------------------------------------------------------
# A hand-made batch: 4 tokens to expert 0 (first choice), known gradients

def hand_record(valid=None):
    E, S = 3, 4
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.5, 0.5, 0.0], [1.0, 0.2, 0.1], [3.0, 0.0, 0.0]])
    return RoutingRecord(router_logits=logits, experts=torch.zeros(S, 1, dtype=torch.long), weights=torch.ones(S, 1),
                         kept=torch.ones(S, 1, dtype=torch.bool), aux_loss=torch.zeros(()), expert_counts=torch.tensor([4, 0, 0]),
                         shape=(1, S), module=SimpleNamespace(gate_inside=False), valid=valid)


def test_hand_made_conflict_is_flagged_and_pushed_away():
    delta = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.1], [0.9, -0.1]])   # token 2 opposes the others
    c = find_conflicts(hand_record(), delta, STGCConfig())
    assert c.conflict.tolist() == [False, False, True, False]
    mean = delta.mean(0)
    assert abs(float(c.cos[2]) - float(torch.nn.functional.cosine_similarity(delta[2], mean, dim=0))) < 1e-6
    logits = hand_record().router_logits.clone().requires_grad_(True)
    conflict_elimination_loss(logits, c).backward()
    assert torch.allclose(logits.grad, cel_logit_grad(logits.detach(), c))
    stepped = logits.detach() - 0.5 * logits.grad                      # one gradient step on the CEL
    assert stepped[2, 0] < logits[2, 0]                                # expert 0's logit of token 2 goes down
    assert (stepped[2, 1:] > logits[2, 1:]).all()                      # the others' go up
    assert torch.equal(stepped[[0, 1, 3]], logits.detach()[[0, 1, 3]])  # no other token moves


def test_padding_never_counts():
    delta = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.1], [-50.0, 3.0]])   # token 3 is padding, and huge
    c = find_conflicts(hand_record(valid=torch.tensor([True, True, True, False])), delta, STGCConfig())
    ref = find_conflicts(hand_record(), torch.cat([delta[:3], torch.zeros(1, 2)]), STGCConfig())   # zero gradient
                                                                       # adds nothing to the mean (cos is scale-free)
    assert c.pair.tolist() == [True, True, True, False] and not c.conflict[3]
    assert torch.allclose(c.cos[:3], ref.cos[:3])                     # the pad token is not in the expert mean
    # through the model: right-padded positions are never pairs
    lm, b = tiny_moe_lm(), batch()
    _, conflicts, _ = run(lm, STGCConfig(enabled=True), b)
    pad_tokens = (~b["attention_mask"].bool()).reshape(-1).nonzero().flatten()
    assert not conflicts[0].pair[torch.isin(conflicts[0].token, pad_tokens)].any()


def test_bias_source_is_the_gradient_of_a_real_output_bias():
    """Phi-2 experts end in fc2 with a bias: the 'bias' per-token gradients u_{n,e} must sum, per expert, to
    autograd's gradient of that expert's fc2.bias under the LM loss (and for MoLE: dL/dy itself)."""
    from stgc import assignments
    lm, b = tiny_moe_lm("ffn", 2, family="phi2"), batch()
    lm.zero_grad()
    out = lm(**b)
    rec = out.routing[0]
    (delta,) = torch.autograd.grad(out.loss, rec.output, retain_graph=True)
    out.loss.backward()
    token, expert, pair, gate, u = assignments(rec, delta.reshape(-1, 64))
    per_expert = torch.zeros(4, 64).index_add_(0, expert, u * pair[:, None])
    assert (per_expert - rec.module.experts.fc2.bias.grad).abs().max() < 1e-6
    assert rec.module.experts.fc2.bias.grad.abs().max() > 1e-4


def test_reference_full_refuses_per_token_gradients_that_would_not_fit(monkeypatch):
    """impl='reference', grad_source='full' materialises [pairs, P] gradients (at StableLM-1.6B x 4, micro-batch 8:
    ~8k pairs x 35M parameters = 1 TiB per expert): it must refuse with the estimate, not run out of memory."""
    import stgc
    lm = tiny_moe_lm()
    b = batch()
    cfg = STGCConfig(enabled=True, grad_source="full", impl="reference")
    monkeypatch.setattr(stgc, "_available_bytes", lambda device: 1000)   # as if 1 kB were free
    with pytest.raises(MemoryError, match=r"per-token gradients of [\d,]+ parameters = .* GiB .*stgc.impl='fast'"):
        STGC(cfg).reference_conflicts(lambda: lm(**b))
    monkeypatch.undo()
    assert STGC(cfg).reference_conflicts(lambda: lm(**b))                 # with the real free memory it runs


def test_reference_full_global_scope_with_an_expert_that_keeps_no_token():
    """mean_scope='global' visits every expert (the all-reduce is a collective), also one with no token on this rank."""
    lm, b = tiny_moe_lm(), batch()
    out = lm(**b)
    r = out.routing[0]
    r.kept = r.kept & (r.experts != 3)                                 # as if expert 3's tokens were all dropped
    delta = torch.randn(r.inputs.shape)
    c = find_conflicts(r, delta, STGCConfig(enabled=True, grad_source="full", impl="reference", mean_scope="global"),
                       materialise=True)
    assert not c.pair[c.expert == 3].any() and c.pair.any()


def test_reference_pass_without_any_gradient_at_a_layer():
    """A layer the loss does not reach gets a zero output gradient of the record's [S, D] shape: no pair conflicts."""
    from dataclasses import replace
    lm, b = tiny_moe_lm(), batch()
    conflicts = STGC(STGCConfig(enabled=True)).reference_conflicts(lambda: replace(lm(**b), loss=lm.lm_head.weight.sum()))
    assert len(conflicts) == 1 and not conflicts[0].conflict.any()


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_positions_no_lm_gradient_reaches_are_never_pairs(impl):
    """Two MoE layers: in the fast path the deeper layer's aux and CEL gradients reach every position of the
    shallower one, also those after the last supervised target, which no LM gradient reaches. Those positions
    must not be pairs (so never conflicts), and a micro-batch with no supervised target gets no CEL."""
    lm, b = tiny_moe_lm(moe_layers=(0, 1)), batch()
    b["labels"][:, 7:] = -100                                          # positions 6.. predict nothing supervised
    _, conflicts, _ = run(lm, STGCConfig(enabled=True, impl=impl, loss_weight=0.5), b)
    T = b["input_ids"].shape[1]
    late = (torch.arange(3 * T) % T) >= 6                              # [S]: no supervised target at or after them
    for c in conflicts:
        assert c.pair.any() and not c.pair[late[c.token]].any()
    b["labels"][:] = -100                                              # nothing supervised at all
    _, conflicts, _ = run(lm, STGCConfig(enabled=True, impl=impl, loss_weight=0.5), b)
    assert all(not c.pair.any() and float(c.cel) == 0.0 for c in conflicts)


def test_logged_statistics_name_their_definition():
    lm, b = tiny_moe_lm(), batch()
    _, _, fast = run(lm, STGCConfig(enabled=True, impl="fast"), b)
    _, _, ref = run(lm, STGCConfig(enabled=True, impl="reference"), b)
    assert [s["definition"] for s in fast.stats(4)] == ["objective"] and [s["definition"] for s in ref.stats(4)] == ["lm_loss"]
