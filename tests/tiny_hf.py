"""Tiny random Hugging Face checkpoints, written to disk in the formats users download, plus
the `transformers` (or, for Qwen-1, an independent slow) reference outputs to compare against.

Used by tests/test_model.py (assertions) and bench/parity.py (the printed parity table).
"""
import json
import math
import os

import torch
import transformers as tf
from safetensors.torch import save_file

VOCAB = 101


def randomize(model, seed=0, std=0.1):
    """Replace the init with large random values so that a mis-mapped tensor (a norm weight
    left at 1, a bias left at 0, swapped q/k) cannot hide behind tiny activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if p.dim() == 1 and "norm" in name and name.endswith("weight") else noise)
    return model


# name -> transformers config of a tiny causal LM exercising that family's options
def lm_configs():
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    return {
        "llama_gqa_llama3rope": tf.LlamaConfig(**small, num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)),
        "llama_bias_tied": tf.LlamaConfig(**small, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
        "mistral_window3": tf.MistralConfig(**small, num_key_value_heads=1, sliding_window=3),
        "qwen2_tied": tf.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True,
                                     rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        "stablelm2": tf.StableLmConfig(**small, num_key_value_heads=4, use_qkv_bias=True, partial_rotary_factor=0.25),
        "stablelm_parallel": tf.StableLmConfig(**small, num_key_value_heads=4, use_parallel_residual=True, partial_rotary_factor=0.5),
        "phi2": tf.PhiConfig(**small, partial_rotary_factor=0.4, hidden_act="gelu_new"),
    }


def hf_causal_lm(cfg, seed=0):
    return randomize(tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"), seed).eval()


def save(model_or_sd, config, path, fmt):
    """Write a checkpoint dir as: safetensors | sharded (safetensors shards + index) | bin | bin_sharded."""
    os.makedirs(path, exist_ok=True)
    if fmt in ("safetensors", "sharded"):
        model_or_sd.save_pretrained(path, max_shard_size="40KB" if fmt == "sharded" else "5GB")
        return path
    config.save_pretrained(path) if hasattr(config, "save_pretrained") else json.dump(config, open(f"{path}/config.json", "w"))
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    sd = {k: v.clone() for k, v in sd.items()}            # tied weights: separate storages for saving
    if fmt == "bin":
        torch.save(sd, f"{path}/pytorch_model.bin")
    elif fmt == "bin_sharded":
        keys = sorted(sd)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
        for file, ks in shards.items():
            torch.save({k: sd[k] for k in ks}, f"{path}/{file}")
        json.dump({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}},
                  open(f"{path}/pytorch_model.bin.index.json", "w"))
    elif fmt == "safetensors_sd":
        save_file(sd, f"{path}/model.safetensors")
    else:
        raise ValueError(fmt)
    return path


def vision_configs():
    v = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7)
    return {"clip": tf.CLIPVisionConfig(**v), "siglip": tf.SiglipVisionConfig(**v)}


def hf_vision(kind, seed=0):
    cfg = vision_configs()[kind]
    cls = tf.CLIPVisionModel if kind == "clip" else tf.SiglipVisionModel
    return randomize(cls(cfg), seed).eval()


def hf_full_clip(seed=0):
    """A full CLIPModel (vision + text), as openai/clip-vit-large-patch14-336 is distributed."""
    cfg = tf.CLIPConfig(vision_config=vision_configs()["clip"].to_dict(),
                        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    return randomize(tf.CLIPModel(cfg), seed).eval()


# ---------------------------------------------------------------------------------------------
# Qwen-1: no class in transformers. A tiny random checkpoint under its real key names, and a slow
# reference written from the documented architecture (docs/moe_llava.md §1.3, §2.2): fused
# c_attn with bias, RMSNorm ln_1/ln_2/ln_f, rotate-half RoPE on all head dims, causal softmax
# attention, MLP c_proj(w1(x) * silu(w2(x))), untied lm_head. Float64, one head at a time.

QWEN1_CONFIG = dict(model_type="qwen", architectures=["QWenLMHeadModel"], vocab_size=VOCAB, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, kv_channels=16, intermediate_size=192,
                    layer_norm_epsilon=1e-6, rotary_pct=1.0, rotary_emb_base=10000, seq_length=64,
                    no_bias=True, tie_word_embeddings=False)


def qwen1_state_dict(cfg=QWEN1_CONFIG, seed=0):
    g = torch.Generator().manual_seed(seed)
    D, F = cfg["hidden_size"], cfg["intermediate_size"] // 2
    r = lambda *s: torch.randn(s, generator=g) * 0.1
    sd = {"transformer.wte.weight": r(cfg["vocab_size"], D), "transformer.ln_f.weight": 1 + r(D),
          "lm_head.weight": r(cfg["vocab_size"], D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": 1 + r(D), p + "attn.c_attn.weight": r(3 * D, D), p + "attn.c_attn.bias": r(3 * D),
               p + "attn.c_proj.weight": r(D, D), p + "ln_2.weight": 1 + r(D), p + "mlp.w1.weight": r(F, D),
               p + "mlp.w2.weight": r(F, D), p + "mlp.c_proj.weight": r(D, F)}
    return sd


def qwen1_reference(sd, ids, cfg=QWEN1_CONFIG, inputs_embeds=None):
    """Logits [T, V] of one unpadded sequence (ids [T], or inputs_embeds [T, D]), float64."""
    sd = {k: v.double() for k, v in sd.items()}
    H, hd, eps = cfg["num_attention_heads"], cfg["kv_channels"], cfg["layer_norm_epsilon"]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rotate(x, pos):                    # x [hd] at position pos; pairs (j, j + hd/2)
        half, out = hd // 2, x.clone()
        for j in range(half):
            a = pos * cfg["rotary_emb_base"] ** (-2 * j / hd)
            out[j] = x[j] * math.cos(a) - x[j + half] * math.sin(a)
            out[j + half] = x[j + half] * math.cos(a) + x[j] * math.sin(a)
        return out

    x = sd["transformer.wte.weight"][ids] if inputs_embeds is None else inputs_embeds.double()
    T = x.shape[0]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "ln_1.weight"])
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(H * hd, dim=-1)
        heads = []
        for n in range(H):
            sl = slice(n * hd, (n + 1) * hd)
            qn = torch.stack([rotate(q[t, sl], t) for t in range(T)])
            kn = torch.stack([rotate(k[t, sl], t) for t in range(T)])
            scores = qn @ kn.T / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, sl])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attn.c_proj.weight"].T
        h = rms(x, sd[p + "ln_2.weight"])
        a1, a2 = h @ sd[p + "mlp.w1.weight"].T, h @ sd[p + "mlp.w2.weight"].T
        x = x + (a1 * a2 * torch.sigmoid(a2)) @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T
