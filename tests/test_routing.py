"""The routing laboratory (moe.py's router objectives, stgc.py's CEL normalisers and schedules, routing.py's
measurements, train_step's log): each objective's defining property on a hand case or a tiny model, and every
measurement against a direct count."""
import math
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import routing
import tiny_hf
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LanguageModel, LlavaConfig, LlavaModel, LMConfig, VisionConfig
from moe import (MoEConfig, RoutingRecord, expert_bias_buffer, route, sequence_aux_loss, update_expert_bias,
                 z_loss)
from stgc import (STGC, STGCConfig, LayerConflicts, cel_logit_grad, conflict_elimination_loss, find_conflicts,
                  kind_stats_from_totals, scheduled)


def record_of(logits, experts=None, valid=None, shape=None):
    S, E = logits.shape
    experts = logits.argmax(-1, keepdim=True) if experts is None else experts
    K = experts.shape[1]
    return RoutingRecord(router_logits=logits, experts=experts, weights=torch.ones(S, K), kept=torch.ones(S, K, dtype=torch.bool),
                         aux_loss=torch.zeros(()), expert_counts=torch.zeros(E), shape=shape or (1, S), valid=valid)


def tiny_moe_lm(expert_bias=False, layers=(0, 1), top_k=2, seed=0, **moe):
    cfg = LMConfig.from_hf(tiny_hf.lm_configs()["stablelm2"].to_dict())
    torch.manual_seed(seed)
    lm = LanguageModel(cfg).install_moe(MoEConfig(num_experts=4, top_k=top_k, capacity_factor=1.0, layers=list(layers),
                                                  expert_bias=expert_bias, **moe))
    return tiny_hf.randomize(lm, seed).train()


def batch(seed=0, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tiny_hf.VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, T - 3:] = 0                                               # right padding
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=mask, labels=labels)

# -----------------------------------------------------------------------------
# Router z-loss


def test_z_loss_value_and_gradient_by_hand():
    # token 0: z = (0, 0), logsumexp = ln 2; token 1: z = (ln 3, 0), logsumexp = ln 4; token 2 is padding
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [40.0, -3.0]], requires_grad=True)
    loss = z_loss(record_of(z, valid=torch.tensor([True, True, False])))
    ln2 = math.log(2.0)
    assert loss.item() == pytest.approx((ln2 ** 2 + (2 * ln2) ** 2) / 2)
    loss.backward()
    # d/dz of mean_s lse_s^2 = 2 lse_s softmax(z_s) / S (S = 2 real tokens); padding gets none
    expected = torch.tensor([[ln2 / 2, ln2 / 2], [2 * 2 * ln2 * 0.75 / 2, 2 * 2 * ln2 * 0.25 / 2], [0.0, 0.0]])
    assert torch.allclose(z.grad, expected, atol=1e-6)

# -----------------------------------------------------------------------------
# Sequence-level balance loss


def test_sequence_aux_of_one_sample_is_the_micro_batch_aux():
    lm = tiny_moe_lm(layers=(1,))
    out = lm(input_ids=batch()["input_ids"][:1])                       # one unpadded sample
    r = out.routing[0]
    seq, micro = sequence_aux_loss(r), r.aux_loss
    assert seq.item() == pytest.approx(micro.item(), rel=1e-6)
    g_seq = torch.autograd.grad(seq, r.router_logits, retain_graph=True)[0]
    g_micro = torch.autograd.grad(micro, r.router_logits)[0]
    assert torch.allclose(g_seq, g_micro, atol=1e-7)


def test_sequence_aux_is_the_mean_of_each_samples_own_aux():
    """Per sample over its real tokens, then averaged: each sample's aux is route()'s aux of that sample alone."""
    b = batch()
    lm = tiny_moe_lm(layers=(1,))
    r = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).routing[0]
    B, T = r.shape
    logits_BTE = r.router_logits.detach().view(B, T, -1)
    own = [route(logits_BTE[i][b["attention_mask"][i].bool()], lm.cfg.moe, training=True)[3] for i in range(B)]
    assert sequence_aux_loss(r).item() == pytest.approx(sum(own).item() / B, rel=1e-6)
    assert not math.isclose(sequence_aux_loss(r).item(), r.aux_loss.item(), rel_tol=1e-3)   # a different loss

# -----------------------------------------------------------------------------
# Aux-loss-free balancing


def test_expert_bias_chooses_but_never_weights():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    cfg = MoEConfig(num_experts=4, top_k=2, dropless=True)
    bias = torch.tensor([0.0, 0.3, -0.2, 0.1])
    experts, w, kept, aux, counts = route(logits, cfg, training=True, bias_E=bias)
    assert torch.equal(experts[:, 0], (logits.softmax(-1) + bias).argmax(-1))          # the bias chooses
    assert not torch.equal(experts, route(logits, cfg, training=True)[0])
    p = logits.softmax(-1).gather(1, experts)                                          # un-biased probabilities
    assert torch.allclose(w, p / p.sum(-1, keepdim=True))                              # ... are the weights
    frac = F.one_hot(experts[:, 0], 4).float().mean(0)
    assert aux.item() == pytest.approx((4 * logits.softmax(-1).mean(0) * frac).sum().item())   # mean_prob un-biased
    assert torch.equal(counts, F.one_hot(experts[:, 0], 4).sum(0))


def test_expert_bias_update_rule_and_balance_on_a_skewed_router():
    layer = tiny_moe_lm(expert_bias=True, layers=(1,)).layers[1].mlp
    assert layer.expert_bias.dtype == torch.float32 and torch.equal(layer.expert_bias, torch.zeros(4))
    update_expert_bias(layer, torch.tensor([10.0, 2.0, 4.0, 4.0]))     # mean 5: only expert 0 is over it
    assert torch.allclose(layer.expert_bias, 1e-3 * torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    # a skewed router: expert 0 gets most tokens; the bias alone (no gradient step) moves the load toward balance
    layer.expert_bias.zero_()
    layer.cfg.expert_bias_rate = 0.005
    D = layer.router.in_features
    with torch.no_grad():
        layer.router.weight[0] += 2.0 / D                              # inputs of mean 1: expert 0's logit + 2
    x = 1 + torch.randn(2, 50, D, generator=torch.Generator().manual_seed(0))
    spread = []
    for _ in range(80):
        _, r = layer(x)
        load = routing.assignment_load(r)
        spread.append(float(load.max() - load.min()))
        w0 = r.router_logits.softmax(-1).gather(1, r.experts) * r.kept      # un-biased probabilities, capacity applied
        assert torch.allclose(r.weights, w0 / w0.sum(-1, keepdim=True).clamp_min(1e-12))   # never the weights
        update_expert_bias(layer, load)
    assert spread[0] >= 50 and max(spread[-10:]) <= 0.3 * spread[0], spread   # then sign steps hover near balance
    assert layer.expert_bias[0] < 0 < layer.expert_bias[1:].max()


def test_expert_bias_is_frozen_at_evaluation_saved_and_loaded_fp32(tmp_path):
    vision = VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    lm = LMConfig.from_hf(tiny_hf.lm_configs()["stablelm2"].to_dict())
    lm.moe = MoEConfig(num_experts=4, top_k=2, layers=[0], expert_bias=True)
    model = LlavaModel(LlavaConfig(vision=vision, lm=lm))
    layer = model.lm.layers[0].mlp
    layer.expert_bias.copy_(torch.tensor([0.003, -0.001, 0.0, -0.002]))
    before = layer.expert_bias.clone()
    for mode in (model.train(), model.eval()):                         # forwards never move it
        mode.lm(input_ids=batch()["input_ids"])
    assert torch.equal(layer.expert_bias, before)
    model.save_pretrained(str(tmp_path))
    for dtype in (torch.float32, torch.bfloat16):
        loaded = LlavaModel.from_pretrained(str(tmp_path), dtype=dtype).lm.layers[0].mlp.expert_bias
        assert loaded.dtype == torch.float32 and torch.allclose(loaded, before, atol=1e-5 if dtype == torch.float32 else 2e-5)
    assert "lm.layers.2.mlp.expert_bias" not in model.state_dict()       # dense layers: none
    plain = LlavaModel(LlavaConfig(vision=vision, lm=LMConfig.from_hf(tiny_hf.lm_configs()["stablelm2"].to_dict())))
    assert not any("expert_bias" in k for k in plain.state_dict())


def test_expert_bias_config_checks():
    with pytest.raises(ValueError, match="expert_bias_rate=-0.1 must be >= 0"):
        MoEConfig(expert_bias=True, expert_bias_rate=-0.1)
    with pytest.raises(ValueError, match="'ffn' MoE layer only"):
        MoEConfig(kind="lora", top_k=1, expert_bias=True)
    assert expert_bias_buffer(MoEConfig(), "cpu") is None

# -----------------------------------------------------------------------------
# CEL normalisers, schedules, conflict statistics without STGC


def hand_conflicts():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 0.0], [0.3, 0.0, 0.1]])
    c = LayerConflicts(token=torch.arange(4), expert=torch.tensor([0, 1, 1, 2]), pair=torch.tensor([True, True, True, False]),
                       cos=torch.tensor([-0.5, 0.2, -0.1, 0.0]), conflict=torch.tensor([True, False, True, False]))
    return logits, c


@pytest.mark.parametrize("norm,denominator", [("conflicts", 2), ("gar", 3 * 2), ("pairs", 3)])
def test_cel_normalisers(norm, denominator):
    logits, c = hand_conflicts()
    nll = -F.log_softmax(-logits, -1)
    expected = (nll[0, 0] + nll[2, 1]) / denominator                   # only conflicting pairs enter the sum
    z = logits.clone().requires_grad_(True)
    loss = conflict_elimination_loss(z, c, norm)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert torch.allclose(z.grad, cel_logit_grad(logits, c, norm), atol=1e-7)     # the fast path's closed form


def test_cel_norm_is_checked():
    with pytest.raises(ValueError, match="stgc.cel_norm='mean' is not one of"):
        STGCConfig(cel_norm="mean")


def test_tau_and_beta_schedules():
    assert scheduled("constant", 0.1, 0.9, 50, 100) == 0.1
    assert scheduled("linear", 0.0, 1.0, 0, 11) == 0.0 and scheduled("linear", 0.0, 1.0, 10, 11) == 1.0
    assert scheduled("linear", 0.0, 1.0, 5, 11) == pytest.approx(0.5)
    assert scheduled("cosine", 1.0, 0.0, 5, 11) == pytest.approx(0.5) and scheduled("cosine", 1.0, 0.0, 10, 11) == pytest.approx(0.0)
    cfg = STGCConfig(enabled=True, loss_weight=0.0, loss_weight_final=0.5, loss_weight_schedule="linear",
                     threshold=-0.2, threshold_final=0.0, threshold_schedule="cosine")
    stgc = STGC(cfg)
    stgc.set_step(4, 5)
    assert (stgc.threshold, stgc.loss_weight) == (pytest.approx(0.0), 0.5)
    assert STGC(STGCConfig()).threshold == 0.0 and STGC(STGCConfig()).loss_weight == 0.01   # constant by default


def test_threshold_schedule_reaches_find_conflicts():
    logits, c = hand_conflicts()
    rec = record_of(logits, experts=torch.zeros(4, 1, dtype=torch.long))
    rec.module = SimpleNamespace(gate_inside=False)
    delta = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])   # cosines to the mean all in (0, 1)
    assert not find_conflicts(rec, delta, STGCConfig()).conflict.any()
    assert find_conflicts(rec, delta, STGCConfig(), threshold=0.99).conflict.all()


def test_measuring_conflicts_without_stgc_changes_no_gradient():
    b = batch()
    grads = []
    for probe in (None, STGC(STGCConfig(), measure_only=True)):
        lm = tiny_moe_lm()
        out = lm(**b)
        if probe is not None:
            probe.attach(out.routing)
        (out.loss + 0.01 * out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
        if probe is not None:
            assert all(c is not None and c.pair.any() for c in probe.conflicts) and probe.layer_weight(2) == 0.0
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_kind_totals_split_the_pairs():
    logits, c = hand_conflicts()
    kinds = torch.tensor([0, 2, 2, -1])
    t = kind_stats_from_totals(c.kind_totals(kinds).tolist(), routing.KINDS)
    assert t["image"] == {"pairs": 1, "conflict_ratio": 1.0, "consistency": -0.5}
    assert t["text"]["pairs"] == 0
    assert t["answer"]["pairs"] == 2 and t["answer"]["conflict_ratio"] == 0.5
    assert t["answer"]["consistency"] == pytest.approx(0.05)

# -----------------------------------------------------------------------------
# Measurements


def test_token_kinds_equal_evals_prompt_kinds():
    from eval import prompt_kinds
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9], [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX]])
    kinds = routing.token_kinds(ids, labels, mask, num_features=3)
    for b in range(2):
        m = mask[b].bool()
        expected = prompt_kinds(ids[b][m].tolist(), 3, labels[b][m].tolist())
        assert kinds[b].tolist() == expected + [-1] * (kinds.shape[1] - len(expected))
    assert kinds.shape == (2, 7)


def test_coactivation_load_and_entropy_equal_direct_counts():
    b = batch()
    out = tiny_moe_lm()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for r in out.routing:
        valid = r.valid.tolist()
        pairs, load = Counter(), Counter()
        for s, (e0, e1) in enumerate(r.experts.tolist()):
            if valid[s]:
                pairs[(min(e0, e1), max(e0, e1))] += 1
                load[e0] += 1
                load[e1] += 1
        t = routing.layer_sums(r).tolist()
        co = torch.tensor(t[6:]).view(4, 4)
        assert {(i, j): int(co[i, j]) for i in range(4) for j in range(4) if co[i, j]} == dict(pairs)
        assert t[2:6] == [load[e] for e in range(4)] and t[0] == sum(valid)
        p = r.router_logits.detach().softmax(-1)[r.valid]
        assert t[1] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
        stats = routing.layer_stats(t, 4, 2)
        n = sum(valid)
        assert stats["coactivation"][0][2] == pytest.approx(max(pairs.values()) / n)
        assert sum(x[2] for x in stats["coactivation"]) == pytest.approx(1.0)    # every token has one pair


def test_load_variance_and_utilisation_by_hand():
    shares, var, util = routing.load_balance([1, 1, 1, 1])
    assert shares == [0.25] * 4 and var == 0.0 and util == pytest.approx(1.0)
    shares, var, util = routing.load_balance([4, 0, 0, 0])
    assert var == pytest.approx((0.75 ** 2 + 3 * 0.25 ** 2) / 4) and util == pytest.approx(0.25)


def test_pathway_counts_equal_direct_counts():
    b = batch()
    out = tiny_moe_lm()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    first_SL = torch.stack([r.experts[:, 0] for r in out.routing], dim=1)
    valid = out.routing[0].valid
    direct = Counter(tuple(r.experts[s, 0].item() for r in out.routing) for s in range(first_SL.shape[0]) if valid[s])
    assert routing.pathway_counts(first_SL, valid) == direct
    top = routing.top_pathways(direct, top=3)
    assert top[0][1] == max(direct.values()) and sum(n for _, n, _ in routing.top_pathways(direct, 100)) == int(valid.sum())


def test_purity_and_nmi_by_hand():
    perfect = routing.purity_nmi([[10, 0], [0, 5]])                    # each expert serves one domain
    assert perfect["purity"] == 1.0 and perfect["nmi"] == pytest.approx(1.0)
    independent = routing.purity_nmi([[4, 4], [2, 2]])                 # experts say nothing of the domain
    assert independent["purity"] == pytest.approx(8 / 12) and independent["nmi"] == pytest.approx(0.0, abs=1e-12)
    # a hand case: p = [[.4, .1], [.1, .4]]; I = 2 * .4 ln(1.6) + 2 * .1 ln(.4); H = ln 2 each side
    mixed = routing.purity_nmi([[4, 1], [1, 4]])
    assert mixed["purity"] == pytest.approx(0.8)
    assert mixed["nmi"] == pytest.approx((0.8 * math.log(1.6) + 0.2 * math.log(0.4)) / math.log(2))

# -----------------------------------------------------------------------------
# train_step: the objective's new terms and the log


@pytest.fixture(scope="module")
def smoke_step(tmp_path_factory):
    """A train_step runner on the smoke config (stage III), one micro-batch of 2 synthetic samples with images."""
    import train
    from data import LlavaJsonDataset, Tokenizer, build_synthetic_dataset, collate
    syn = str(tmp_path_factory.mktemp("syn"))
    build_synthetic_dataset(syn, seed=0, n_train=8, n_val=2, n_test=2, image_size=32)
    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.toml")
    data = [f"--data.data_path={syn}/train.json", f"--data.image_folder={syn}/images", f"--data.tokenizer_path={syn}/tokenizer.json"]

    def run(overrides, steps=1):
        cfg = train.load_config(smoke, data + ["--train.stage=moe", "--train.lr=1e-3"] + overrides)
        tok = Tokenizer.load(cfg.data.tokenizer_path, cfg.data.tokenizer_family)
        ds = LlavaJsonDataset(cfg.data, tok)
        torch.manual_seed(0)
        ctx = train.single_process_context(cfg, tok)
        model = ctx.raw
        mb = collate([ds[i] for i in range(2)], tok.pad_id, "right", cfg.data.image_size)
        logs = [train.train_step(ctx, [mb], k, 10) for k in range(steps)]
        return logs, model
    return run


def test_train_log_has_the_routing_measurements_and_defaults_train_as_before(smoke_step):
    (log,), model = smoke_step([])
    (log_off,), model_off = smoke_step(["--stgc.measure=false"])
    sd, sd_off = model.state_dict(), model_off.state_dict()
    assert all(torch.equal(sd[k], sd_off[k]) for k in sd)              # measuring changes no weight
    assert "stgc" not in log_off and "routing" in log_off
    layers = log["routing"]
    assert [x["layer"] for x in layers] == [0] and log["loss"] == pytest.approx(log_off["loss"])
    x = layers[0]
    assert set(x) >= {"entropy", "load", "load_var", "utilisation", "coactivation", "z_loss", "seq_aux_loss", "tokens"}
    assert 0 < x["entropy"] <= math.log(4) and sum(x["load"]) == pytest.approx(1.0) and 0.25 <= x["utilisation"] <= 1
    assert x["z_loss"] > 0 and log["z_loss"] == x["z_loss"] and "expert_bias" not in x
    per_kind = log["stgc"][0]["per_kind"]                               # conflicts measured although STGC is off
    assert set(per_kind) == {"image", "text", "answer"}
    assert sum(k["pairs"] for k in per_kind.values()) == log["stgc"][0]["pairs"] > 0
    assert per_kind["image"]["pairs"] > 0 and per_kind["answer"]["pairs"] > 0


def test_train_step_trains_z_loss_seq_aux_and_moves_the_bias(smoke_step):
    logs, _ = smoke_step(["--moe.expert_bias=true", "--moe.aux_loss_coef=0.0", "--moe.z_loss_coef=0.01",
                          "--moe.seq_aux_loss_coef=0.01", "--stgc.enabled=true"], steps=2)
    (plain,), _ = smoke_step([])
    for log in logs:                                                   # every term in the logged objective
        assert log["loss"] == pytest.approx(log["lm_loss"] + 0.01 * log["z_loss"] + 0.01 * log["seq_aux_loss"]
                                            + log["stgc_beta"] * log["cel"], rel=1e-6)
        assert log["z_loss"] > 0 and log["seq_aux_loss"] > 0
    bias = [log["routing"][0]["expert_bias"] for log in logs]
    load = logs[0]["routing"][0]["load"]
    expected = [0.001 * math.copysign(1, 0.25 - p) if p != 0.25 else 0.0 for p in load]
    assert bias[0] == pytest.approx(expected)                          # one step of gamma * sign(mean - load)
    assert all(min(abs(b - v) for v in (-0.002, -0.001, 0.0, 0.001, 0.002)) < 1e-7 for b in bias[1])
    assert logs[0]["lm_loss"] == pytest.approx(plain["lm_loss"])       # a zero bias routes as before
