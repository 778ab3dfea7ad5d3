"""model.py against transformers (and an independent Qwen-1 reference) on tiny random checkpoints
written to disk in every format users download; KV cache, batching and bad-input behaviour."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file

import tiny_hf
from model import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, KVCache, LanguageModel, LlavaModel, LMConfig,
                   VisionTower, load_checkpoint)
from moe import MoEConfig

TOL = 1e-4          # max abs difference of fp32 logits / features allowed against the reference

# each family is written in a different on-disk format, so every format is exercised
LM_FORMATS = {"llama_gqa_llama3rope": "safetensors", "llama_bias_tied": "bin", "mistral_window3": "sharded",
              "qwen2_tied": "bin_sharded", "stablelm2": "safetensors", "stablelm_parallel": "sharded", "phi2": "bin"}


def random_ids(B, T, seed=0):
    return torch.randint(0, tiny_hf.VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(LM_FORMATS))
def test_lm_logits_match_transformers(name, tmp_path):
    cfg = tiny_hf.lm_configs()[name]
    hf = tiny_hf.hf_causal_lm(cfg)
    path = tiny_hf.save(hf, cfg, str(tmp_path / name), LM_FORMATS[name])
    ours = LanguageModel.from_pretrained(path)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                         # right padding, as in training
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (out[valid] - ref[valid]).abs().max() < TOL
    assert ref.abs().max() > 0.5                            # the comparison is not between near-zero tensors


def qwen1_checkpoint(path, fmt="safetensors"):
    os.makedirs(path, exist_ok=True)
    json.dump(tiny_hf.QWEN1_CONFIG, open(f"{path}/config.json", "w"))
    sd = tiny_hf.qwen1_state_dict()
    sd["transformer.rotary_emb.inv_freq"] = torch.ones(8)      # a buffer some saves carry: documented ignorable
    if fmt == "safetensors":
        save_file(sd, f"{path}/model.safetensors")
    else:
        torch.save(sd, f"{path}/pytorch_model.bin")
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_qwen1_matches_independent_reference(fmt, tmp_path):
    ours = LanguageModel.from_pretrained(qwen1_checkpoint(str(tmp_path / "qwen"), fmt))
    assert ours.cfg.family == "qwen" and ours.cfg.intermediate_size == 96    # each of w1, w2 is half of 192
    ids = random_ids(2, 9)
    with torch.no_grad():
        out = ours(input_ids=ids).logits
    sd = tiny_hf.qwen1_state_dict()
    for b in range(2):
        ref = tiny_hf.qwen1_reference(sd, ids[b])
        assert (out[b].double() - ref).abs().max() < TOL


def test_qwen1_key_map_splits_fused_c_attn(tmp_path):
    ours = LanguageModel.from_pretrained(qwen1_checkpoint(str(tmp_path / "qwen")))
    sd = tiny_hf.qwen1_state_dict()
    q, k, v = sd["transformer.h.1.attn.c_attn.weight"].chunk(3)
    assert torch.equal(ours.layers[1].attn.k_proj.weight, k)
    assert torch.equal(ours.layers[1].attn.v_proj.bias, sd["transformer.h.1.attn.c_attn.bias"][128:])
    assert torch.equal(ours.layers[0].mlp.gate_proj.weight, sd["transformer.h.0.mlp.w2.weight"])   # silu side
    assert torch.equal(ours.layers[0].mlp.up_proj.weight, sd["transformer.h.0.mlp.w1.weight"])


@pytest.mark.parametrize("kind,select_layer,select_feature,full", [
    ("clip", -2, "patch", False), ("clip", -2, "patch", True), ("clip", -1, "cls_patch", False),
    ("siglip", -2, "patch", False), ("siglip", 1, "cls_patch", False)])
def test_vision_features_match_transformers(kind, select_layer, select_feature, full, tmp_path):
    hf = tiny_hf.hf_full_clip() if full else tiny_hf.hf_vision(kind)
    path = str(tmp_path / "tower")
    hf.save_pretrained(path)
    ours = VisionTower.from_pretrained(path, select_layer=select_layer, select_feature=select_feature)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tower = hf.vision_model if full else hf
        ref = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
        ref = ref[:, 1:] if select_feature == "patch" else ref
        out = ours(pixels)
    # CLIP: 16 patches + class token; SigLIP has no class token, yet 'patch' drops token 0 (15 = MoE-LLaVA's 728 quirk)
    expect_n = {"clip": 16, "siglip": 16}[kind] + (kind == "clip") - (select_feature == "patch")
    assert out.shape == ref.shape == (2, expect_n, 48) and ours.cfg.num_features == expect_n
    assert (out - ref).abs().max() < TOL


# ---------------------------------------------------------------------------------------------
# LLaVA / MoE-LLaVA checkpoints: LLM keys + mm_projector keys (+ the saved tower, ignored)

def llava_checkpoint(tmp_path, layout):
    """Write (llava dir, tower dir) in the layout of a MoE-LLaVA stage-II StableLM checkpoint,
    a MoE-LLaVA Qwen-1 one, or a LLaVA-1.5 (Llama) one. Returns paths and the references used."""
    tower = tiny_hf.hf_vision("clip", seed=1)
    tower_dir = str(tmp_path / "clip")
    tower.save_pretrained(tower_dir)
    g = torch.Generator().manual_seed(2)
    if layout == "qwen":
        cfg, lm_sd, D, root = dict(tiny_hf.QWEN1_CONFIG), tiny_hf.qwen1_state_dict(), 64, "transformer"
        cfg["model_type"] = "llava_qwen"
        hf_lm = None
    else:
        hf_cfg = tiny_hf.lm_configs()["stablelm2" if layout == "moe_llava_stablelm" else "llama_gqa_llama3rope"]
        hf_lm = tiny_hf.hf_causal_lm(hf_cfg, seed=3)
        cfg, lm_sd, D, root = hf_cfg.to_dict(), hf_lm.state_dict(), hf_cfg.hidden_size, "model"
        cfg["model_type"] = "llava_stablelm" if layout == "moe_llava_stablelm" else "llava"
    proj = {"0.weight": torch.randn(D, 48, generator=g) * 0.1, "0.bias": torch.randn(D, generator=g) * 0.1,
            "2.weight": torch.randn(D, D, generator=g) * 0.1, "2.bias": torch.randn(D, generator=g) * 0.1}
    proj_prefix = f"{root}.mm_projector." + ("" if layout == "llava15" else "image_spatial_proj.")
    sd = dict(lm_sd) | {proj_prefix + k: v for k, v in proj.items()}
    tower_prefix = f"{root}.image_tower.image_tower." if layout != "llava15" else "model.vision_tower.vision_tower."
    sd |= {tower_prefix + "vision_model." + k: v for k, v in tower.state_dict().items()}   # saved, ignored on load
    cfg |= {"mm_hidden_size": 48, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            ("mm_projector_type" if layout == "llava15" else "image_projector_type"): "mlp2x_gelu",
            ("mm_vision_tower" if layout == "llava15" else "mm_image_tower"): "openai/clip-vit-large-patch14-336"}
    path = str(tmp_path / layout)
    os.makedirs(path)
    json.dump(cfg, open(f"{path}/config.json", "w"))
    save_file({k: v.contiguous() for k, v in sd.items()}, f"{path}/model.safetensors")
    return path, tower_dir, tower, proj, hf_lm, lm_sd


def reference_llava_logits(tower, proj, hf_lm, lm_sd, layout, ids, images):
    """Tower hidden_states[-2] minus token 0 -> Linear, GELU, Linear -> splice -> LM, one sample."""
    feats = tower(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = F.linear(F.gelu(F.linear(feats, proj["0.weight"], proj["0.bias"])), proj["2.weight"], proj["2.bias"])
    embed = lm_sd["transformer.wte.weight" if layout == "qwen" else "model.embed_tokens.weight"]
    parts, img = [], 0
    for t in ids.tolist():
        if t == IMAGE_TOKEN_INDEX:
            parts.append(feats[img])
            img += 1
        else:
            parts.append(embed[t][None])
    emb = torch.cat(parts)
    if layout == "qwen":
        return tiny_hf.qwen1_reference(lm_sd, None, inputs_embeds=emb).float()
    return hf_lm(inputs_embeds=emb[None]).logits[0]


@pytest.mark.parametrize("layout", ["moe_llava_stablelm", "qwen", "llava15"])
def test_llava_checkpoint_matches_reference(layout, tmp_path):
    path, tower_dir, tower, proj, hf_lm, lm_sd = llava_checkpoint(tmp_path, layout)
    model = LlavaModel.from_pretrained(path, vision_tower=tower_dir)
    ids = torch.tensor([[5, 7, IMAGE_TOKEN_INDEX, 9, 11, 3, IMAGE_TOKEN_INDEX, 4]])
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = reference_llava_logits(tower, proj, hf_lm, lm_sd, layout, ids[0], images)
        out = model(ids, images).logits[0]
    assert out.shape == (6 + 2 * 16, tiny_hf.VOCAB)
    assert (out - ref).abs().max() < TOL


def test_llava_without_tower_dir_says_what_to_pass(tmp_path):
    path, *_ = llava_checkpoint(tmp_path, "moe_llava_stablelm")
    with pytest.raises(ValueError, match="clip-vit-large-patch14-336.*vision_tower="):
        LlavaModel.from_pretrained(path)


def test_llava_loss_supervises_only_labelled_text(tmp_path):
    path, tower_dir, *_ = llava_checkpoint(tmp_path, "moe_llava_stablelm")
    model = LlavaModel.from_pretrained(path, vision_tower=tower_dir)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 9, 11, 3, 4], [6, 8, IMAGE_TOKEN_INDEX, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 11, 3, 4], [-100, -100, -100, 2, -100, -100]])
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model(ids, images, labels=labels, attention_mask=mask)
        logits = model(ids, images, attention_mask=mask).logits         # spliced: [2, 5 + 16, V]
    # after splicing, sample 0's supervised tokens 11, 3, 4 sit at 18, 19, 20, predicted from 17, 18, 19;
    # sample 1's token 2 sits at 18, predicted from 17
    pred = torch.stack([logits[0, 17], logits[0, 18], logits[0, 19], logits[1, 17]])
    manual = F.cross_entropy(pred, torch.tensor([11, 3, 4, 2]))
    assert out.num_tokens == 4 and out.logits is None
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_image_count_mismatch_raises(tmp_path):
    path, tower_dir, *_ = llava_checkpoint(tmp_path, "moe_llava_stablelm")
    model = LlavaModel.from_pretrained(path, vision_tower=tower_dir)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 9], [IMAGE_TOKEN_INDEX, 1, IMAGE_TOKEN_INDEX]])
    with pytest.raises(ValueError, match=r"3 <image> placeholders \(per sample: \[1, 2\]\) but 2 images"):
        model(ids, torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="but 0 images"):
        model.generate([[5, IMAGE_TOKEN_INDEX]], images=None, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# KV cache and generation

def our_random_lm(name, seed=0):
    return tiny_hf.randomize(LanguageModel(LMConfig.from_hf(tiny_hf.lm_configs()[name].to_dict())), seed).eval()


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "mistral_window3", "phi2", "stablelm2"])
def test_kv_cache_decoding_equals_full_forward(name):
    lm = our_random_lm(name)
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = lm(input_ids=ids).logits                                # [2, 10, V]
        cache = KVCache(lm.cfg, 2, 10, torch.float32, "cpu")
        steps = [lm(input_ids=ids[:, :6], kv_cache=cache).logits]      # prefill 6, then one at a time
        steps += [lm(input_ids=ids[:, t:t + 1], kv_cache=cache).logits for t in range(6, 10)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_batched_left_padded_generate_equals_one_at_a_time():
    lm = our_random_lm("llama_gqa_llama3rope")
    prompts = [[3, 14, 15, 92, 65, 35], [8, 9], [27, 18, 28, 18]]
    single = [lm.generate(input_ids=[p], max_new_tokens=8)[0] for p in prompts]
    assert all(len(s) == 8 for s in single)
    assert lm.generate(input_ids=prompts, max_new_tokens=8) == single
    # stop per sequence at EOS: pick a token the second prompt emits at step 3
    eos = single[1][3]
    stopped = lm.generate(input_ids=prompts, max_new_tokens=8, eos_token_id=eos)
    for s, full in zip(stopped, single):
        assert s == (full[:full.index(eos)] if eos in full else full)
    assert len(stopped[1]) == 3


def test_generate_matches_transformers_greedy(tmp_path):
    cfg = tiny_hf.lm_configs()["stablelm2"]
    hf = tiny_hf.hf_causal_lm(cfg)
    path = tiny_hf.save(hf, cfg, str(tmp_path / "m"), "safetensors")
    ours = LanguageModel.from_pretrained(path)
    prompt = [3, 14, 15, 92, 65]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=10)[0, len(prompt):].tolist()
    assert ours.generate(input_ids=[prompt], max_new_tokens=10) == [ref]


def test_llava_batched_generate_equals_one_at_a_time(tmp_path):
    path, tower_dir, *_ = llava_checkpoint(tmp_path, "moe_llava_stablelm")
    model = LlavaModel.from_pretrained(path, vision_tower=tower_dir)
    prompts = [[5, IMAGE_TOKEN_INDEX, 9, 11], [IMAGE_TOKEN_INDEX, 7], [4, 4, 4]]   # the last is text-only
    images = torch.randn(2, 3, 28, 28)
    single = [model.generate([prompts[0]], images[:1], max_new_tokens=6)[0],
              model.generate([prompts[1]], images[1:], max_new_tokens=6)[0],
              model.generate([prompts[2]], None, max_new_tokens=6)[0]]
    assert model.generate(prompts, images, max_new_tokens=6) == single


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: clear errors naming the key; no pickled code runs

class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "evil")
    tiny_hf.save(tiny_hf.hf_causal_lm(tiny_hf.lm_configs()["stablelm2"]), tiny_hf.lm_configs()["stablelm2"], path, "bin")
    sd = torch.load(f"{path}/pytorch_model.bin", weights_only=True)
    sd["payload"] = _Exploit()
    torch.save(sd, f"{path}/pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to load"):
        LanguageModel.from_pretrained(path)
    assert not os.path.exists(tmp_path / "pwned_by_pickle")


@pytest.fixture
def stablelm_dir(tmp_path):
    cfg = tiny_hf.lm_configs()["stablelm2"]
    return tiny_hf.save(tiny_hf.hf_causal_lm(cfg), cfg, str(tmp_path / "m"), "safetensors")


def test_missing_key_is_named(stablelm_dir):
    sd = load_file(f"{stablelm_dir}/model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f"{stablelm_dir}/model.safetensors")
    with pytest.raises(KeyError, match=r"missing checkpoint keys for \['layers.1.mlp.up_proj.weight'\]"):
        LanguageModel.from_pretrained(stablelm_dir)


def test_unexpected_key_is_named(stablelm_dir):
    sd = load_file(f"{stablelm_dir}/model.safetensors")
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    save_file(sd, f"{stablelm_dir}/model.safetensors")
    with pytest.raises(KeyError, match="unexpected checkpoint key 'model.layers.0.mlp.extra_proj.weight'"):
        LanguageModel.from_pretrained(stablelm_dir)


def test_bias_absent_from_config_is_named(stablelm_dir):
    cfg = json.load(open(f"{stablelm_dir}/config.json"))
    cfg["use_qkv_bias"] = False                                      # the checkpoint has q/k/v biases
    json.dump(cfg, open(f"{stablelm_dir}/config.json", "w"))
    with pytest.raises(KeyError, match=r"model.layers.0.self_attn.[qkv]_proj.bias"):
        LanguageModel.from_pretrained(stablelm_dir)


def test_shape_mismatch_is_named(stablelm_dir):
    cfg = json.load(open(f"{stablelm_dir}/config.json"))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(f"{stablelm_dir}/config.json", "w"))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.mlp.(gate|up|down)_proj.weight'"):
        LanguageModel.from_pretrained(stablelm_dir)


def test_missing_weights_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        LanguageModel.from_pretrained(str(tmp_path))
    json.dump(tiny_hf.QWEN1_CONFIG, open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_checkpoint(str(tmp_path))


def test_bf16_loading_keeps_dtype_and_close_logits(stablelm_dir):
    fp32 = LanguageModel.from_pretrained(stablelm_dir)
    bf16 = LanguageModel.from_pretrained(stablelm_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = random_ids(1, 8)
    with torch.no_grad():
        a, b = fp32(input_ids=ids).logits, bf16(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_our_format_round_trip_with_moe_and_tied_head(tmp_path):
    from model import LlavaConfig, VisionConfig
    from moe import MoEConfig
    cfg = LlavaConfig(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                          num_layers=3, num_heads=4),
                      lm=LMConfig(family="stablelm", vocab_size=256, hidden_size=96, intermediate_size=192, num_layers=4,
                                  num_heads=4, norm="layernorm", tie_embeddings=True, moe=MoEConfig(num_experts=3)))
    model = tiny_hf.randomize(LlavaModel(cfg)).eval()
    model.save_pretrained(str(tmp_path / "ours"), {"data": {"template": "phi"}})
    loaded = LlavaModel.from_pretrained(str(tmp_path / "ours"))          # no vision_tower needed: it is inside
    ids, images = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6]]), torch.randn(1, 3, 32, 32)
    assert torch.equal(model(ids, images).logits, loaded(ids, images).logits)
    assert loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight
    assert loaded.cfg == model.cfg and loaded.lm.layers[2].mlp.router.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Padding routes as in MoE-LLaVA: padding tokens are routed and count toward capacity (DeepSpeed)

class RecordingMoE(torch.nn.Module):
    """Our MoE layer inside a transformers model (in place of its MLP): returns y, keeps the routing record."""

    def __init__(self, moe):
        super().__init__()
        self.moe, self.record = moe, None

    def forward(self, x):
        y, self.record = self.moe(x)
        return y


def test_right_padded_batch_routes_as_the_original(tmp_path):
    """A right-padded batch at a capacity that drops tokens: transformers' own masking and positions (no position
    ids, as MoE-LLaVA trains) around our MoE layer, vs our model. Where the padding tokens are routed decides
    which real tokens are dropped, so the padding rows' router logits must agree too."""
    cfg = tiny_hf.lm_configs()["stablelm2"]
    hf = tiny_hf.hf_causal_lm(cfg)
    path = tiny_hf.save(hf, cfg, str(tmp_path / "m"), "safetensors")
    ours = LanguageModel.from_pretrained(path)
    torch.manual_seed(0)
    ours.install_moe(MoEConfig(num_experts=4, top_k=2, eval_capacity_factor=1.0, layers=[1]))
    tiny_hf.randomize(ours.layers[1].mlp, seed=3, std=0.3)             # experts that differ, a sharp router
    ours.eval()
    hf.model.layers[1].mlp = RecordingMoE(ours.layers[1].mlp)          # the same module, run inside transformers
    ids = random_ids(3, 16, seed=1)
    mask = torch.ones_like(ids)
    mask[0, 5:], mask[1, 11:] = 0, 0                                   # right padding, as in training
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, attention_mask=mask).logits
        ref = hf.model.layers[1].mlp.record
        out = ours(input_ids=ids, attention_mask=mask)
    rec, real = out.routing[0], mask.bool().reshape(-1)
    assert (~rec.kept[real]).any(), "the capacity must drop some real assignments for the test to mean anything"
    assert (rec.router_logits - ref.router_logits).abs().max() < 1e-4     # padding rows included
    assert torch.equal(rec.kept, ref.kept) and torch.equal(rec.experts, ref.experts)
    assert (out.logits[mask.bool()] - ref_logits[mask.bool()]).abs().max() < 1e-4
