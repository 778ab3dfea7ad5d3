"""LLaVA-MoLE as released (docs/llava_mole.md). A tiny checkpoint written here in the released layout
(docs/llava_mole.md §5) is loaded by model.load_mole_release and compared with a slow
reference of the released forward, also written here from the facts: HF's CLIPVisionModel and LlamaForCausalLM
(what the release runs) in float64, with its LoRA-expert MLPs, attention LoRA, projector and start / end tokens
patched in as plain loops. Then the released balance loss, the top-1 coefficients, the options' errors, STGC on
both mixtures (fast == reference), the prompt (no BOS) and the evaluation's repetition penalty."""
import copy
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf

import tiny_hf
from model import IMAGE_TOKEN_INDEX, LanguageModel, LMConfig, load_mole_release
from moe import LoRAExperts, MoEConfig
from stgc import STGCConfig, per_token_grads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import stgc_agreement  # noqa: E402  (one STGC training step, as tests/test_stgc.py uses it)

E, RANK, ALPHA = 3, 4, 32.0                    # the file name below says r16: the loader must take 4 from the shapes
LLM = "llm_model.base_model.model."
PROJ = ("gate", "up", "down")


def tiny_llama():
    cfg = tf.LlamaConfig(vocab_size=tiny_hf.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128)
    return tiny_hf.hf_causal_lm(cfg, seed=1)


def released_state_dict(hf_lm, hf_clip, spelling="weight", frozen=True, seed=0):
    """The released module tree's names (docs/llava_mole.md §5): expert LoRA A [r, in] / B [out, r] per projection and
    expert, routers with a bias, peft attention LoRA, in_adaptor, the tower under vit.vision_tower. frozen=False:
    only the trainable tensors (the release loads with strict=False, so both are valid files)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.2: torch.randn(s, generator=g) * std
    cfg = hf_lm.config
    D, Fw, C = cfg.hidden_size, cfg.intermediate_size, hf_clip.config.hidden_size
    sd = {}
    if frozen:
        for k, v in hf_lm.state_dict().items():
            k = k.replace(".mlp.", ".mlp.original_module.")
            if spelling == "base_layer" and ".self_attn." in k:
                k = k.replace(".weight", ".base_layer.weight")
            sd[LLM + k] = v.clone()
        # transformers 4.x (the release's) names the CLIPVisionModel's weights vision_model.*; 5.x saves them without
        sd |= {"vit.vision_tower.vision_model." + k.removeprefix("vision_model."): v.clone()
               for k, v in hf_clip.state_dict().items()}
    dims = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "gate": (D, Fw), "up": (D, Fw), "down": (Fw, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"{LLM}model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.lora_A.default.weight"] = rnd(RANK, dims[n][0])
            sd[p + f"self_attn.{n}_proj.lora_B.default.weight"] = rnd(dims[n][1], RANK, std=0.02)
        for n in PROJ:
            for e in range(E):
                sd[p + f"mlp.moe_{n}.{e}.lora_A"] = rnd(RANK, dims[n][0])
                sd[p + f"mlp.moe_{n}.{e}.lora_B"] = rnd(dims[n][1], RANK, std=0.02)
        sd[p + "mlp.router.weight"], sd[p + "mlp.router.bias"] = rnd(E, D, std=2.0), rnd(E)   # mixed routing
    sd |= {"in_adaptor.projector.0.weight": rnd(D, C), "in_adaptor.projector.0.bias": rnd(D),
           "in_adaptor.projector.2.weight": rnd(D, D), "in_adaptor.projector.2.bias": rnd(D),
           "in_adaptor.visual_start_token": rnd(1, 1, D, std=D ** -0.5), "in_adaptor.visual_end_token": rnd(1, 1, D, std=D ** -0.5)}
    return sd


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Vicuna and CLIP dirs (save_pretrained, as the other tests write them) and the released files."""
    root = tmp_path_factory.mktemp("mole")
    hf_lm, hf_clip = tiny_llama(), tiny_hf.hf_vision("clip", seed=2)
    hf_lm.save_pretrained(root / "vicuna")
    hf_clip.save_pretrained(root / "clip")
    files = {}
    for spelling, frozen in (("weight", True), ("base_layer", False)):
        sd = released_state_dict(hf_lm, hf_clip, spelling, frozen)
        files[spelling] = root / f"{spelling}_llava_mole_r16_a32_e3.pt"
        torch.save({"state_dict": sd}, files[spelling])
    return dict(root=root, hf_lm=hf_lm, hf_clip=hf_clip, files=files, sd=released_state_dict(hf_lm, hf_clip))

# ---------------------------------------------------------------------------------------------
# The reference: the released forward, float64, from the facts (docs/llava_mole.md §1), independent of model.py / moe.py


class RefLoRA(nn.Module):
    """peft LoRA on a frozen Linear: W x + (alpha / r) B A x (dropout off at evaluation)."""

    def __init__(self, base, A, B):
        super().__init__()
        self.base, self.A, self.B = base, A.double(), B.double()

    def forward(self, x):
        return self.base(x) + (ALPHA / RANK) * (x @ self.A.T) @ self.B.T


class RefMoLEMLP(nn.Module):
    """Every layer's MLP: frozen gate / up / down, a biased router on the MLP input, per expert and projection a LoRA
    pair. dense: W x + sum_e p_e LoRA_e(x); sparse: W x + LoRA_argmax(x), coefficient 1. Records the probabilities."""

    def __init__(self, mlp, sd, prefix, dense, probs):
        super().__init__()
        self.mlp, self.dense, self.probs = mlp, dense, probs
        self.Wr, self.br = sd[prefix + "router.weight"].double(), sd[prefix + "router.bias"].double()
        self.A = {n: [sd[prefix + f"moe_{n}.{e}.lora_A"].double() for e in range(E)] for n in PROJ}
        self.B = {n: [sd[prefix + f"moe_{n}.{e}.lora_B"].double() for e in range(E)] for n in PROJ}

    def forward(self, x):                                              # [1, T, D]
        probs = torch.softmax(x @ self.Wr.T + self.br, dim=-1)         # [1, T, E]
        self.probs.append(probs[0])
        coef = probs if self.dense else F.one_hot(probs.argmax(-1), E).double()

        def proj(n, h):
            out = getattr(self.mlp, f"{n}_proj")(h)
            for e in range(E):                                         # one expert at a time
                out = out + coef[..., e:e + 1] * (ALPHA / RANK) * (h @ self.A[n][e].T) @ self.B[n][e].T
            return out
        return proj("down", F.silu(proj("gate", x)) * proj("up", x))


def reference_forward(hf_lm, hf_clip, sd, ids_list, images, dense):
    """Per sample, unpadded: logits [T'_b, V] and the router probabilities of each layer [T'_b, E]; and the released
    balance loss: per sample over its positions with the layers pooled, sum_e mean(p)_e * mean(onehot)_e, / B."""
    clip = copy.deepcopy(hf_clip).double().eval()
    llama = copy.deepcopy(hf_lm).double().eval()
    probs = []
    for i, layer in enumerate(llama.model.layers):
        p = f"{LLM}model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            setattr(layer.self_attn, f"{n}_proj", RefLoRA(getattr(layer.self_attn, f"{n}_proj"),
                                                          sd[p + f"self_attn.{n}_proj.lora_A.default.weight"],
                                                          sd[p + f"self_attn.{n}_proj.lora_B.default.weight"]))
        layer.mlp = RefMoLEMLP(layer.mlp, sd, p + "mlp.", dense, probs)
    with torch.no_grad():
        feats = clip(pixel_values=images.double(), output_hidden_states=True).hidden_states[-1][:, 1:]   # last layer, no CLS
        w = {k: sd["in_adaptor." + k].double() for k in ("projector.0.weight", "projector.0.bias",
                                                          "projector.2.weight", "projector.2.bias")}
        feats = F.gelu(feats @ w["projector.0.weight"].T + w["projector.0.bias"]) @ w["projector.2.weight"].T + w["projector.2.bias"]
        start, end = sd["in_adaptor.visual_start_token"].double()[0], sd["in_adaptor.visual_end_token"].double()[0]
        logits, loss, next_image = [], 0.0, 0
        for ids in ids_list:
            parts, piece = [], []
            for t in ids + [None]:
                if t is None or t == IMAGE_TOKEN_INDEX:
                    if piece:
                        parts.append(llama.model.embed_tokens(torch.tensor(piece)))
                    if t is not None:
                        parts += [start, feats[next_image], end]        # 1 + P + 1 positions
                        next_image += 1
                    piece = []
                else:
                    piece.append(t)
            probs.clear()
            logits.append(llama(inputs_embeds=torch.cat(parts)[None]).logits[0])
            p_LTE = torch.stack(probs)
            onehot = F.one_hot(p_LTE.argmax(-1), E).double()
            loss += (p_LTE.mean(dim=(0, 1)) * onehot.mean(dim=(0, 1))).sum()
    return logits, loss / len(ids_list)


IDS = [[5, 7, IMAGE_TOKEN_INDEX, 9, 11, 13], [4, IMAGE_TOKEN_INDEX, 8, 10, IMAGE_TOKEN_INDEX, 12, 3, 2]]


def padded(ids_list):
    T = max(len(x) for x in ids_list)
    ids = torch.tensor([x + [0] * (T - len(x)) for x in ids_list])
    return ids, torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids_list])


@pytest.mark.parametrize("mixture,spelling", [("soft", "base_layer"), ("top1", "weight")])
def test_released_checkpoint_matches_the_reference_forward(release, mixture, spelling, capsys):
    """soft + peft's base_layer spelling + a trainable-only file (frozen weights from the dirs); top1 + the plain
    spelling + a file with everything. Logits to 1e-5, and the balance loss equals the released formula."""
    r = release
    model = load_mole_release(r["files"][spelling], r["root"] / "vicuna", r["root"] / "clip", mixture=mixture)
    log = capsys.readouterr().out
    assert re.search(r"3 experts on 2 layers, rank 4 from the tensor shapes \(the file name says r16\), attention "
                     r"LoRA rank 4, alpha 32 from the file name .*LoRA scale 8", log), log
    assert ("0 frozen ones" in log) == (spelling == "weight")
    assert model.cfg.vision.select_layer == -1 and model.cfg.image_positions == model.cfg.vision.num_features + 2
    moe = model.lm.cfg.moe
    assert (moe.mole_router_bias, moe.mole_balance, moe.layers, moe.lora_alpha) == (True, "released", "dense", ALPHA)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    ids, mask = padded(IDS)
    out = model(ids, images, attention_mask=mask)
    ref_logits, ref_balance = reference_forward(r["hf_lm"], r["hf_clip"], r["sd"], IDS, images, mixture == "soft")
    diff = max((out.logits[b, :len(ref)] - ref).abs().max().item() for b, ref in enumerate(ref_logits))
    print(f"{mixture}: max |logits - reference| = {diff:.2e}, balance {out.aux_loss.item():.6f} vs {ref_balance.item():.6f}")
    assert diff < 1e-5
    assert abs(out.aux_loss.item() - ref_balance.item()) < 1e-6
    assert len(set(out.routing[0].experts[:, 0].tolist())) == E      # every expert chosen somewhere: top-1 != soft
    other, _ = reference_forward(r["hf_lm"], r["hf_clip"], r["sd"], IDS[:1], images[:1], mixture != "soft")
    assert (other[0] - ref_logits[0]).abs().max() > 1e-3             # the two modes differ on these weights


def test_released_balance_loss_pools_layers_per_sample_without_E(release):
    """Against a hand computation on the routing records: not Switch's E * sum_e f_e P_e per layer summed."""
    r = release
    model = load_mole_release(r["files"]["weight"], r["root"] / "vicuna", r["root"] / "clip", log=lambda s: None)
    ids, mask = padded(IDS)
    out = model(ids, torch.randn(3, 3, 28, 28), attention_mask=mask)
    B, T = out.routing[0].shape
    valid = out.routing[0].valid.view(B, T)
    want = 0.0
    for b in range(B):
        p = torch.cat([rec.router_logits.softmax(-1).view(B, T, E)[b][valid[b]] for rec in out.routing])   # [L*T_b, E]
        want += (p.mean(0) * F.one_hot(p.argmax(-1), E).float().mean(0)).sum()
    assert torch.allclose(out.aux_loss, want / B, atol=1e-6)
    switch = sum(rec.aux_loss for rec in out.routing)
    assert not torch.allclose(out.aux_loss, switch)
    out.aux_loss.backward()                                            # its gradient reaches the routers only
    assert model.lm.layers[0].mlp.router.bias.grad.abs().sum() > 0


def test_loader_is_strict_and_never_unpickles_code(release, tmp_path):
    r = release
    dirs = (r["root"] / "vicuna", r["root"] / "clip")
    sd = dict(r["sd"])
    sd["llm_model.base_model.model.model.layers.0.mlp.moe_gate.0.lora_C"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "extra_a32.pt")
    with pytest.raises(KeyError, match=r"unexpected checkpoint key '.*moe_gate\.0\.lora_C'"):
        load_mole_release(tmp_path / "extra_a32.pt", *dirs, log=lambda s: None)
    sd = {k: v for k, v in r["sd"].items() if k != f"{LLM}model.layers.1.mlp.router.bias"}
    torch.save({"state_dict": sd}, tmp_path / "nobias_a32.pt")
    with pytest.raises(KeyError, match=r"missing checkpoint keys for \['lm\.layers\.1\.mlp\.router\.bias'\]"):
        load_mole_release(tmp_path / "nobias_a32.pt", *dirs, log=lambda s: None)
    torch.save({"state_dict": r["sd"], "args": copy.deepcopy}, tmp_path / "code_a32.pt")   # a pickled function
    with pytest.raises(ValueError, match="refused to load \\(weights_only=True\\)"):
        load_mole_release(tmp_path / "code_a32.pt", *dirs, log=lambda s: None)
    torch.save({"state_dict": r["sd"]}, tmp_path / "noalpha.pt")
    with pytest.raises(ValueError, match="no alpha in the file name"):
        load_mole_release(tmp_path / "noalpha.pt", *dirs, log=lambda s: None)
    lines = []
    m = load_mole_release(tmp_path / "noalpha.pt", *dirs, alpha=8, log=lines.append)
    assert "alpha 8 given: LoRA scale 2" in lines[0] and m.lm.layers[0].mlp.scale == 2.0

# ---------------------------------------------------------------------------------------------
# The options: top-1 coefficients, config errors, today's behaviour kept


def mole_lm(seed=0, **moe):
    cfg = LMConfig.from_hf(tiny_llama().config.to_dict())
    torch.manual_seed(seed)
    lm = LanguageModel(cfg).install_moe(MoEConfig(**dict(kind="lora", num_experts=E, top_k=1, layers="dense",
                                                         lora_rank=RANK, lora_dropout=0.0, mole_router_bias=True) | moe))
    tiny_hf.randomize(lm, seed)
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, LoRAExperts):
                m.router.weight.mul_(5)                               # routing that differs between tokens
    return lm.train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tiny_hf.VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def test_top1_coefficients_one_straight_through_and_prob():
    """'one' (released sparse): coefficient 1, no LM gradient to the router; 'straight_through': the same forward,
    and the LM loss reaches the router; 'prob' (ours before the release): p_e scales the delta."""
    b = batch()
    runs = {}
    for gate in ("one", "straight_through", "prob"):
        lm = mole_lm(mole_mixture="top1", mole_top1_gate=gate)
        out = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        out.logits.sum().backward()
        rec = out.routing[0]
        runs[gate] = (out.logits.detach(), lm.layers[0].mlp.router.weight.grad, rec.weights, rec.router_logits.softmax(-1))
    assert (runs["one"][0] - runs["straight_through"][0]).abs().max() < 1e-5
    assert runs["one"][1] is None or runs["one"][1].abs().max() == 0
    assert runs["straight_through"][1].abs().max() > 0 and runs["prob"][1].abs().max() > 0
    assert (runs["one"][0] - runs["prob"][0]).abs().max() > 1e-4
    assert torch.allclose(runs["one"][2], torch.ones_like(runs["one"][2]))
    assert torch.allclose(runs["prob"][2][:, 0], runs["prob"][3].max(-1).values) and (runs["prob"][2] < 0.99).any()


@pytest.mark.parametrize("override,message", [
    ("--moe.mole_mixture=dense", r"moe\.mole_mixture='dense' is not one of \('soft', 'top1'\)"),
    ("--moe.mole_top1_gate=st", r"moe\.mole_top1_gate='st' is not one of \('one', 'straight_through', 'prob'\)"),
    ("--moe.mole_balance=deepspeed", r"moe\.mole_balance='deepspeed' is not one of \('switch', 'released'\)"),
])
def test_misspelt_mole_options_are_one_line_errors(override, message):
    import train
    with pytest.raises(train.ConfigError, match=message) as e:
        train.load_config(None, ["--moe.kind=lora", "--moe.top_k=1", override])
    assert "\n" not in str(e.value)
    with pytest.raises(train.ConfigError, match=r"moe\.mole_router_bias=True is a LLaVA-MoLE option: it needs moe\.kind='lora'"):
        train.load_config(None, ["--moe.mole_router_bias=true"])


@pytest.mark.parametrize("preset", ["mole_llava15.toml", "lora_llava15.toml"])
def test_presets_hold_the_released_values(preset):
    import train
    cfg = train.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", preset))
    m = cfg.moe
    assert (m.kind, m.top_k, m.layers, m.lora_rank, m.lora_alpha, m.lora_dropout, m.attn_lora_rank) == \
        ("lora", 1, "dense", 16, 32.0, 0.05, 16)
    assert cfg.data.template == "mole_v1"
    if preset.startswith("mole"):
        assert (m.num_experts, m.mole_router_bias, m.mole_mixture, m.mole_balance) == (3, True, "soft", "released")

# ---------------------------------------------------------------------------------------------
# STGC on MoLE: the soft mixture (the chosen expert = argmax; every expert contributes) and top-1


@pytest.mark.parametrize("mixture,gate", [("soft", "one"), ("top1", "one"), ("top1", "straight_through")])
def test_expert_function_is_the_layer_and_its_gradient(mixture, gate):
    """expert_apply(expert_params(e), x, weight) equals the layer's output for tokens routed to e, and its per-token
    gradient (torch.func, what STGC's reference uses) equals autograd through the layer itself on e's LoRA."""
    layer = next(m for m in mole_lm(mole_mixture=mixture, mole_top1_gate=gate).modules() if isinstance(m, LoRAExperts))
    layer.eval()
    x = torch.randn(2, 6, 32)
    y, rec = layer(x)
    x_SD, e_S, w_S = x.reshape(-1, 32), rec.experts[:, 0], rec.weights[:, 0].detach()
    assert len(set(e_S.tolist())) > 1
    u = torch.randn(12, 32)
    for e in set(e_S.tolist()):
        idx = (e_S == e).nonzero().flatten()
        ref = layer.expert_apply(layer.expert_params(e), x_SD[idx], w_S[idx])
        assert (y.reshape(-1, 32)[idx] - ref).abs().max() < 1e-5
        g = per_token_grads(layer, e, x_SD[idx], u[idx], w_S[idx])  # [n, P]
        for j, n in enumerate(idx.tolist()):
            params = [layer.lora_A[p] for p in ("gate_proj", "up_proj", "down_proj")] + \
                     [layer.lora_B[p] for p in ("gate_proj", "up_proj", "down_proj")]
            y_n, _ = layer(x_SD[n].view(1, 1, 32))
            grads = torch.autograd.grad((u[n] * y_n[0, 0]).sum(), params)
            naive = torch.cat([torch.cat([grads[k][e].reshape(-1), grads[k + 3][e].reshape(-1)]) for k in range(3)])
            assert (g[j] - naive).abs().max() < 1e-5


@pytest.mark.parametrize("source", ["bias", "full"])
@pytest.mark.parametrize("mixture,gate", [("soft", "one"), ("top1", "one"), ("top1", "straight_through")])
def test_stgc_fast_equals_reference_on_mole(mixture, gate, source):
    lm, b = mole_lm(mole_mixture=mixture, mole_top1_gate=gate, mole_balance="released", layers=[1]), batch()
    cfg = dict(enabled=True, grad_source=source, loss_weight=0.5, threshold=0.3)
    stgc_ref = stgc_agreement.stgc_step(lm, b, STGCConfig(impl="reference", **cfg))
    g_ref = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    stgc_fast = stgc_agreement.stgc_step(lm, b, STGCConfig(impl="fast", **cfg))
    g_fast = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    c_ref, c_fast = stgc_ref.conflicts[0], stgc_fast.conflicts[0]
    assert c_ref.conflict.sum() > 0 and torch.equal(c_ref.conflict, c_fast.conflict)
    assert (c_ref.cos - c_fast.cos).abs().max() < 1e-5 and abs(float(c_ref.cel) - float(c_fast.cel)) < 1e-5
    assert g_ref.keys() == g_fast.keys() and any("router" in n for n in g_ref)
    for n in g_ref:
        assert (g_ref[n] - g_fast[n]).abs().max() < 1e-5, n

# ---------------------------------------------------------------------------------------------
# Prompt and evaluation


def test_mole_prompt_has_no_bos_and_the_image_newline_goes_with_the_marker():
    from data import TEMPLATES, Tokenizer, tokenize_conversation, train_bpe_tokenizer
    corpus = ["A chat between a curious user and an artificial intelligence assistant. USER: What? ASSISTANT: Red."] * 4
    tok = Tokenizer(train_bpe_tokenizer(corpus, 300, ["<unk>", "<s>", "</s>"]), "llama")
    turns = ["<image>\nWhat?", "Red."]
    v1, mole = TEMPLATES["v1"], TEMPLATES["mole_v1"]
    assert mole.render(turns) == v1.render(turns).replace("<image>\n", "<image>")
    ids_v1, _ = tokenize_conversation(tok, v1, turns)
    ids, labels = tokenize_conversation(tok, mole, turns)
    assert ids_v1[0] == tok.bos_id and tok.bos_id not in ids
    assert ids == tok.tokenize_with_images(mole.render(turns), bos=False)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]).strip() == "Red."


def test_repetition_penalty_equals_transformers_on_the_generated_tokens():
    """HF's RepetitionPenaltyLogitsProcessor over the generated ids (from inputs_embeds HF generate starts them
    empty), full forward per step, against our KV-cached batched generate."""
    lm = mole_lm(mole_mixture="soft").eval()
    prompts = [torch.tensor([5, 7, 9]), torch.tensor([4, 8])]
    ours = lm.generate(prompts, max_new_tokens=8, repetition_penalty=10.0)
    plain = lm.generate(prompts, max_new_tokens=8)
    proc = tf.RepetitionPenaltyLogitsProcessor(10.0)
    with torch.no_grad():
        for p, got in zip(prompts, ours):
            new = torch.zeros(1, 0, dtype=torch.long)
            for _ in range(8):
                logits = lm(input_ids=torch.cat([p[None], new], dim=1)).logits[:, -1]
                new = torch.cat([new, proc(new, logits).argmax(-1, keepdim=True)], dim=1)
            assert got == new[0].tolist()
    assert ours != plain and all(len(set(x)) == len(x) for x in ours)   # a penalty of 10 forbids repeats here
