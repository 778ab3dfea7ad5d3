"""
model.py: the vision-language model of MoE-LLaVA / LLaVA-1.5, written to be read.

    pixels -> VisionTower (CLIP or SigLIP ViT) -> Projector (mlp2x_gelu | linear)
           -> spliced into the token embeddings at each <image> placeholder
           -> LanguageModel (one decoder, per-family options) -> logits

What is here, top to bottom:
  1. configs        VisionConfig, LMConfig, LlavaConfig (dataclasses; `from_hf` reads HF config.json)
  2. vision tower   CLIP ViT (class token, pre-LN, quick-GELU) and SigLIP ViT (no class token,
                    tanh-GELU); returns the hidden state of `select_layer` (default -2)
  3. projector      mlp2x_gelu (Linear, exact GELU, Linear) or linear
  4. decoder        RMSNorm/LayerNorm, RoPE (HF rotate-half convention, partial rotary), attention
                    with SDPA + GQA + KV cache, SwiGLU or GELU MLP, sequential or parallel blocks.
                    Families: Llama / Mistral / Qwen2 ('llama'), StableLM-2 ('stablelm'),
                    Phi-2 ('phi'), Qwen-1 ('qwen'). One class, options, no class per family.
  5. LLaVA glue     image features spliced at IMAGE_TOKEN_INDEX positions (labels -100 there), optionally between
                    LLaVA-MoLE's learned start / end tokens
  6. generation     batched greedy decoding, left padding, KV cache, per-sequence EOS stop
  7. loading        HF checkpoint dirs (safetensors, sharded, or pytorch_model.bin read with
                    weights_only=True) through one strict key map per family.
  8. LLaVA-MoLE     its released checkpoint format (load_mole_release, docs/llava_mole.md §5).
  9. run dirs and processes   latest_checkpoint (a train.py run dir -> its latest step), setup_distributed
                    (torchrun's ranks): what train.py and eval.py share.

The semantics follow docs/moe_llava.md §1-3 (MoE-LLaVA at 6cb5f66, transformers 4.37);
MoE layers (moe.py) replace the dense MLPs in Step 2 and report routing through `out.routing`.

Shapes: B batch, T tokens, S cached keys, D model width, H / Hkv query / key-value heads,
hd head dim, V vocab, N images, P patches per image, C vision width.
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.distributed
import torch.nn.functional as F
import torch.utils.checkpoint

from moe import (MoEConfig, apply_attention_lora, check_choice, is_moe_trainable, is_routed, make_moe_mlp, mole_balance_loss,
                 routers_to_fp32)

IGNORE_INDEX = -100        # label value the loss ignores (MoE-LLaVA constants.py)
IMAGE_TOKEN_INDEX = -200   # input id standing for one image's features (MoE-LLaVA constants.py)

# -----------------------------------------------------------------------------
# 1. Configs

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,                                           # exact erf GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),      # Phi-2; same formula as HF gelu_new
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),     # OpenAI CLIP
}


@dataclass
class VisionConfig:
    kind: str = "clip"                 # 'clip' (class token, pre-LN) | 'siglip' (no class token, patch bias)
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    num_channels: int = 3
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    select_layer: int = -2             # index into HF hidden_states (0 = embeddings); -2 = penultimate block
    select_feature: str = "patch"      # 'patch' drops token 0 (also for SigLIP: 728 tokens, MoE-LLaVA parity)

    def __post_init__(self):
        check_choice("model.vision.kind", self.kind, ("clip", "siglip"))
        check_choice("model.vision.select_feature", self.select_feature, ("patch", "cls_patch"))
        check_choice("model.vision.act", self.act, ACTIVATIONS)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + (self.kind == "clip")
        # hidden_states has num_layers + 1 entries; only the blocks up to select_layer are ever run, so
        # only those are built (the skipped blocks and post-LN are documented ignorable checkpoint keys).
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"model.vision.select_layer={self.select_layer} out of range for num_layers={self.num_layers} "
                             f"(-{self.num_layers + 1}..{self.num_layers})")
        self.num_layers_run = n
        self.num_features = self.num_positions - (self.select_feature == "patch")   # P: 576 CLIP-336, 728 SigLIP-384

    @classmethod
    def from_hf(cls, cfg: dict, **overrides):
        """From an HF config.json of CLIPVisionModel / SiglipVisionModel, or CLIPModel / SiglipModel
        (its vision_config). Absent fields take the HF class defaults, as HF itself does."""
        kind = "siglip" if cfg.get("model_type", "").startswith("siglip") else "clip"
        if "vision_config" in cfg:
            cfg = cfg["vision_config"]
        defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32 if kind == "clip" else 16,
                        hidden_act="quick_gelu" if kind == "clip" else "gelu_pytorch_tanh",
                        layer_norm_eps=1e-5 if kind == "clip" else 1e-6)
        get = lambda k: cfg.get(k, defaults[k])
        return cls(kind=kind, image_size=get("image_size"), patch_size=get("patch_size"),
                   hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                   num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                   num_channels=get("num_channels"), norm_eps=get("layer_norm_eps"), act=get("hidden_act"),
                   **overrides)


@dataclass
class LMConfig:
    family: str = "llama"              # 'llama' (Llama, Mistral, Qwen2) | 'stablelm' | 'phi' | 'qwen' (Qwen-1)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008     # per branch (Qwen-1's config stores twice this)
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 0              # 0 -> num_heads (no GQA)
    head_dim: int = 0                  # 0 -> hidden_size // num_heads
    norm: str = "rmsnorm"              # 'rmsnorm' | 'layernorm' (with bias)
    norm_eps: float = 1e-6
    mlp: str = "swiglu"                # 'swiglu' (gate/up/down) | 'gelu' (fc1 -> act -> fc2, Phi-2)
    act: str = "silu"
    parallel_block: bool = False       # Phi-2 / StableLM parallel residual: x + Attn(LN(x)) + MLP(LN(x))
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (StableLM-2 0.25, Phi-2 0.4)
    rope_scaling: dict = field(default_factory=dict)   # {} | {'rope_type': 'linear'|'llama3', ...}
    sliding_window: int = 0            # 0 = none; Mistral-style window over cache positions
    max_position_embeddings: int = 4096
    moe: MoEConfig = None              # None: dense; else which MLPs become MoE / MoLE layers (moe.py)

    def __post_init__(self):
        if isinstance(self.moe, dict):                                 # from a saved config JSON
            self.moe = MoEConfig(**self.moe)
        check_choice("model.lm.family", self.family, ("llama", "stablelm", "phi", "qwen"))
        check_choice("model.lm.norm", self.norm, ("rmsnorm", "layernorm"))
        check_choice("model.lm.mlp", self.mlp, ("swiglu", "gelu"))
        check_choice("model.lm.act", self.act, ACTIVATIONS)
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.lm.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        rope_type = self.rope_scaling.get("rope_type", "default")
        check_choice("model.lm.rope_scaling.rope_type", rope_type, ("default", "linear", "llama3"))

    @classmethod
    def from_hf(cls, cfg: dict):
        """From an HF config.json: llama / mistral / qwen2 / stablelm (also the older stablelm_epoch
        names) / phi / qwen (Qwen-1) and the llava_* / moe_llava_* configs built on them.
        Absent fields take the HF class defaults of that family."""
        model_type = cfg.get("model_type", "")
        lm = cls._from_hf_dense(cfg, model_type)
        if (cfg.get("moe") or {}).get("moe_enable"):                   # MoE-LLaVA stage-III checkpoint
            lm.moe = MoEConfig.from_moe_llava(cfg["moe"], lm.num_layers)
        return lm

    @classmethod
    def _from_hf_dense(cls, cfg, model_type):
        base = re.sub(r"^(moe_)?llava_?", "", model_type) or "llama"   # 'llava' alone is LLaVA-1.5 on Llama
        g = cfg.get
        if base.startswith("qwen1_5") or base.startswith("qwen2"):
            base = "qwen2"
        rope = dict(g("rope_parameters") or {})                  # transformers >= 5
        rope.update({k: v for k, v in (g("rope_scaling") or {}).items() if k not in rope})  # transformers 4
        if "type" in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", g("rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", None)
        scaling = rope if rope.get("rope_type", "default") != "default" else {}
        common = dict(vocab_size=g("vocab_size"), hidden_size=g("hidden_size"),
                      num_layers=g("num_hidden_layers"), num_heads=g("num_attention_heads"),
                      max_position_embeddings=g("max_position_embeddings", 4096))
        if g("qk_layernorm", False):
            raise ValueError(f"{model_type}: qk_layernorm=True is not supported (StableLM-2-12B style)")
        if base in ("llama", "mistral", "qwen2"):
            if base == "qwen2" and g("use_sliding_window", False):
                raise ValueError("qwen2 with use_sliding_window=True is not supported")
            window = g("sliding_window", 4096) if base == "mistral" else 0
            bias = base == "qwen2" or g("attention_bias", False)   # Qwen2 has q/k/v biases, no o bias
            return cls(family="llama", **common, intermediate_size=g("intermediate_size"),
                       num_kv_heads=g("num_key_value_heads") or 0, head_dim=g("head_dim") or 0,
                       norm="rmsnorm", norm_eps=g("rms_norm_eps", 1e-6), mlp="swiglu", act=g("hidden_act", "silu"),
                       qkv_bias=bias, o_bias=bias and base != "qwen2", mlp_bias=g("mlp_bias", False),
                       tie_embeddings=g("tie_word_embeddings", False), rope_theta=theta,
                       partial_rotary_factor=partial or 1.0, rope_scaling=scaling, sliding_window=window or 0)
        if base.startswith("stablelm"):
            return cls(family="stablelm", **common, intermediate_size=g("intermediate_size"),
                       num_kv_heads=g("num_key_value_heads") or 0, norm="layernorm",
                       norm_eps=g("layer_norm_eps", g("norm_eps", 1e-5)), mlp="swiglu", act=g("hidden_act", "silu"),
                       parallel_block=g("use_parallel_residual", False), qkv_bias=g("use_qkv_bias", False),
                       tie_embeddings=g("tie_word_embeddings", False), rope_theta=theta,
                       partial_rotary_factor=partial or g("partial_rotary_factor", g("rope_pct", 0.25)),
                       rope_scaling=scaling)
        if base.startswith("phi"):
            # MoE-LLaVA builds Phi's lm_head with bias=False and drops the pretrained bias (docs/moe_llava.md §1.3).
            return cls(family="phi", **common, intermediate_size=g("intermediate_size"),
                       num_kv_heads=g("num_key_value_heads") or 0, norm="layernorm",
                       norm_eps=g("layer_norm_eps", 1e-5), mlp="gelu", act=g("hidden_act", "gelu_new"),
                       parallel_block=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                       lm_head_bias="llava" not in model_type, tie_embeddings=g("tie_word_embeddings", False),
                       rope_theta=theta, partial_rotary_factor=partial or g("partial_rotary_factor", 0.5),
                       rope_scaling=scaling)
        if base == "qwen":
            # Qwen-1 switches on dynamic NTK and log-n attention only past seq_length; we do not, so
            # positions beyond seq_length would differ from the original (never reached at 2048 + 576).
            return cls(family="qwen", **common | dict(max_position_embeddings=g("seq_length", 8192)),
                       intermediate_size=g("intermediate_size") // 2,   # w1 and w2 are each half of it
                       head_dim=g("kv_channels") or 0, norm="rmsnorm", norm_eps=g("layer_norm_epsilon", 1e-6),
                       mlp="swiglu", act="silu", qkv_bias=True, o_bias=not g("no_bias", True),
                       mlp_bias=not g("no_bias", True), tie_embeddings=g("tie_word_embeddings", False),
                       rope_theta=g("rotary_emb_base", 10000.0), partial_rotary_factor=g("rotary_pct", 1.0))
        raise ValueError(f"config.json model_type {model_type!r} is not a supported language model "
                         "(llama, mistral, qwen2, stablelm, phi, qwen, and their llava_/moe_llava_ variants)")


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    projector: str = "mlp2x_gelu"      # 'mlp2x_gelu' | 'linear'
    # LLaVA-MoLE as released: a learned start and end embedding right before and after each image's projected
    # features, P + 2 positions per image (docs/llava_mole.md §1). They live in the projector (the released
    # `in_adaptor` holds both), so they train and save with it.
    image_start_end: bool = False

    def __post_init__(self):                                           # from a saved config JSON
        self.vision = VisionConfig(**self.vision) if isinstance(self.vision, dict) else self.vision
        self.lm = LMConfig(**self.lm) if isinstance(self.lm, dict) else self.lm
        check_choice("model.projector", self.projector, ("mlp2x_gelu", "linear"))

    @property
    def image_positions(self) -> int:
        """Sequence positions one image takes after splicing: its P features (+ the start and end tokens)."""
        return self.vision.num_features + 2 * self.image_start_end

# -----------------------------------------------------------------------------
# 2. Vision tower


class ViTBlock(nn.Module):
    """Pre-LN transformer block of CLIP / SigLIP: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D, self.H = cfg.hidden_size, cfg.num_heads
        self.attn_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc1, self.fc2 = nn.Linear(D, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, D)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        B, N, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, N, self.H, D // self.H).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v)                    # [B, H, N, hd], no mask
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(self.act(self.fc1(self.mlp_norm(x))))      # [B, N, C]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        clip = cfg.kind == "clip"
        self.patch_embed = nn.Conv2d(cfg.num_channels, C, cfg.patch_size, stride=cfg.patch_size, bias=not clip)
        self.class_embedding = nn.Parameter(torch.zeros(C)) if clip else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_positions, C))
        self.pre_norm = nn.LayerNorm(C, eps=cfg.norm_eps) if clip else nn.Identity()   # CLIP's 'pre_layrnorm'
        self.layers = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers_run))
        self.apply(_init_weights)
        if clip:
            nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, pixel_values):                                   # [B, 3, H, W]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                               # [B, P, C]
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)                             # [B, 1+P, C]
        x = self.pre_norm(x + self.pos_embed)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.cfg.select_feature == "patch" else x   # [B, P, C]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, select_layer=-2, select_feature="patch"):
        cfg = VisionConfig.from_hf(_read_config(path), select_layer=select_layer, select_feature=select_feature)
        with torch.device("meta"):
            model = cls(cfg)
        sd = convert_state_dict(load_checkpoint(path, dtype), vision_key_map(cfg),
                                VISION_IGNORED + _skipped_vision_layers(cfg), model.state_dict(), path)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()

# -----------------------------------------------------------------------------
# 3. Projector


class Projector(nn.Sequential):
    """mlp2x_gelu: Linear(C, D), GELU (exact), Linear(D, D) -- LLaVA-1.5 / MoE-LLaVA; or one Linear.
    start_end: also LLaVA-MoLE's learned start / end token embeddings [1, 1, D] (normal, std D^-0.5, as released);
    the caller (LlavaModel.encode_images) places them around each image, the Sequential itself never runs them."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, start_end: bool = False):
        if kind == "mlp2x_gelu":
            super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        elif kind == "linear":
            super().__init__(nn.Linear(in_dim, out_dim))
        else:
            raise ValueError(f"unknown projector {kind!r} (mlp2x_gelu | linear)")
        self.apply(_init_weights)
        self.start_token = self.end_token = None
        if start_end:
            self.start_token = nn.Parameter(torch.randn(1, 1, out_dim) * out_dim ** -0.5)
            self.end_token = nn.Parameter(torch.randn(1, 1, out_dim) * out_dim ** -0.5)

# -----------------------------------------------------------------------------
# 4. Decoder language model


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale: the order HF Llama/Qwen use (matters in bf16)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(cfg: LMConfig):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def rope_inv_freq(cfg: LMConfig, device=None):
    """Inverse frequencies of the rotated dims [rotary_dim/2], with linear / llama3 scaling."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim)
    s = cfg.rope_scaling
    if s.get("rope_type") == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s.get("rope_type") == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor, lo, hi, old_ctx = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, position_ids, dtype):
    freqs = position_ids[..., None].float() * inv_freq                 # [B, T, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)                            # [B, T, rot]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, rot]


def apply_rope(x, cos, sin):
    """HF rotate-half RoPE on the first `rot` dims of each head; the rest pass (partial rotary)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]                         # [B, H, T, rot], [B, H, T, hd-rot]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([x_rot, x_pass], dim=-1)


class KVCache:
    """Preallocated keys and values of every layer, [L, B, Hkv, S_max, hd]; `length` = filled positions."""

    def __init__(self, cfg: LMConfig, batch_size, max_len, dtype, device):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0                # advanced by LanguageModel after all layers have written

    def update(self, layer, k, v):                                     # k, v: [B, Hkv, T, hd]
        start, end = self.length, self.length + k.shape[2]
        assert end <= self.k.shape[3], f"KV cache overflow: {end} > {self.k.shape[3]}"
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]     # [B, Hkv, S, hd]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.H, self.Hkv, self.hd = H, Hkv, hd
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)     # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)   # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)   # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)                        # [B, Hkv, S, hd]
        # mask None means plain causal over T == S (training, prefill without padding): SDPA's fast path.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.H != self.Hkv)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.hd))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)). Llama/Mistral/Qwen2/StableLM; Qwen-1's c_proj(w1(x) * silu(w2(x)))
    is the same with gate = w2, up = w1, down = c_proj (the key map renames them)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        D, F_, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(D, F_, bias=b), nn.Linear(D, F_, bias=b)
        self.down_proj = nn.Linear(F_, D, bias=b)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc2(act(fc1(x))), with biases: Phi-2 (act = gelu_new)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = None if cfg.parallel_block else make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer_idx=0):
        """Returns the new residual stream and the MoE routing record (None for a dense MLP)."""
        h = self.attn_norm(x)
        if self.parallel:      # Phi-2 (and StableLM use_parallel_residual): one LN feeds both branches
            a = self.attn(h, cos, sin, mask, kv_cache, layer_idx)
        else:
            x = x + self.attn(h, cos, sin, mask, kv_cache, layer_idx)
            h = self.mlp_norm(x)
        y, record = self.mlp(h) if is_routed(self.mlp) else (self.mlp(h), None)   # routed: (y, RoutingRecord)
        return (x + a + y if self.parallel else x + y), record


@dataclass
class ModelOutput:
    logits: torch.Tensor = None        # [B, T, V]; None when labels were given (see LanguageModel.forward)
    loss: torch.Tensor = None          # mean cross-entropy over supervised tokens
    num_tokens: torch.Tensor = None    # number of supervised tokens behind `loss`
    aux_loss: torch.Tensor = None      # sum over MoE layers of the load-balancing loss (0 for dense)
    routing: list = field(default_factory=list)   # one routing record per MoE layer (moe.py)


def attention_mask_4d(attention_mask, past_len, T, sliding_window=0):
    """Boolean [B, 1, T, S] mask, S = past_len + T, True = may attend; or None for plain causal.

    attention_mask [B, S]: 1 for real tokens, 0 for padding (left padding in generation, right in
    training). Key j is visible to query i (at cache position past_len + i) when it is a real token,
    j <= past_len + i, and, with a sliding window, past_len + i - j < window (HF Mistral). That is HF's
    masking exactly, also for padding queries: a right-padding query sees the real keys before it, not
    itself. Padding queries matter because their tokens are routed and count toward expert capacity, as in
    DeepSpeed (README, MoE layers). Only a row that would be empty (a left-padding query in generation) gets
    its own key, since an all-masked row gives NaN in SDPA; nothing real reads those rows.
    """
    S = past_len + T
    if attention_mask is None and not sliding_window and (past_len == 0 or T == 1):
        return None                    # causal (is_causal in SDPA) or one query that sees every key
    q_pos = torch.arange(past_len, S, device=attention_mask.device if attention_mask is not None else None)
    k_pos = torch.arange(S, device=q_pos.device)
    rel = q_pos[:, None] - k_pos[None, :]                              # [T, S]
    visible = rel >= 0
    if sliding_window:
        visible &= rel < sliding_window
    mask = visible[None, None]                                         # [1, 1, T, S]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :S].bool()         # [B, 1, T, S]
    empty = ~mask.any(dim=-1, keepdim=True)                            # [B, 1, T, 1]
    return mask | (empty & (rel == 0))


def padded_positions(attention_mask):
    """Position ids [B, S] of a padded batch, as the originals give them. Real tokens count real tokens
    before them, so a left-padded prompt starts at 0 (HF generate's cumsum - 1); left padding gets 1 (HF
    generate's fill value); right padding keeps its index, as MoE-LLaVA trains with no position ids (0..T-1).
    Padding positions are never read by a real token, but their hidden states are routed (capacity)."""
    real = attention_mask.bool()
    seen = attention_mask.long().cumsum(-1)                            # real tokens up to and including j
    index = torch.arange(attention_mask.shape[-1], device=attention_mask.device).expand_as(seen)
    return torch.where(real, seen - 1, torch.where(seen == 0, torch.ones_like(seen), index))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.apply(_init_weights)
        self.tie_weights()
        self.activation_checkpointing = False   # recompute each block in the backward (train.py sets it)
        if cfg.moe is not None:
            self.install_moe(cfg.moe)

    def install_moe(self, moe_cfg: MoEConfig):
        """Turn the dense MLPs of the chosen layers into MoE (experts = exact copies of the dense FFN:
        MoE-LLaVA's upcycling, docs/moe_llava.md §1.8) or MoLE layers; stage III calls this on a dense model."""
        self.cfg.moe = moe_cfg
        for i in moe_cfg.layer_indices(len(self.layers)):
            self.layers[i].mlp = make_moe_mlp(moe_cfg, self.layers[i].mlp)
        if moe_cfg.kind == "lora" and moe_cfg.attn_lora_rank:
            apply_attention_lora(self.layers, moe_cfg)
        return self.train(self.training)          # new modules start in training mode: follow the model's

    def set_moe(self, moe_cfg: MoEConfig):
        """New runtime settings (capacities, coefficients, impl, second expert) for the MoE layers this model
        already has; their structure must be moe_cfg's (train.resolve_moe checks it)."""
        self.cfg.moe = moe_cfg
        for block in self.layers:
            if is_routed(block.mlp):
                block.mlp.configure(moe_cfg)
        return self

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, kv_cache=None):
        """Final-norm hidden states [B, T, D] and the MoE routing records.
        attention_mask [B, S] covers cached + new tokens."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # [B, T, D]
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None:
            position_ids = padded_positions(attention_mask)[:, past:past + T]   # [B, T]
        else:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(rope_inv_freq(self.cfg, x.device), position_ids, x.dtype)
        mask = attention_mask_4d(attention_mask, past, T, self.cfg.sliding_window)
        valid = attention_mask[:, past:past + T].bool().reshape(-1) if attention_mask is not None else None
        routing = []
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, record = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x, record = layer(x, cos, sin, mask, kv_cache, i)
            if record is not None:
                record.layer, record.valid = i, valid
                routing.append(record)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x), routing

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, kv_cache=None):
        """Logits, or with `labels` [B, T] the next-token loss. With labels the full [B, T, V] logits
        are not materialised: only supervised positions go through lm_head (most VLM positions are
        image or prompt tokens), and `logits` is None."""
        h, routing = self.hidden_states(input_ids, inputs_embeds, attention_mask, kv_cache)   # [B, T, D]
        aux = sum((r.aux_loss for r in routing), h.new_zeros((), dtype=torch.float32))   # unweighted; alpha in train.py
        if routing and self.cfg.moe.kind == "lora" and self.cfg.moe.mole_balance == "released":
            aux = mole_balance_loss(routing)                           # layers pooled per sample, not a sum (moe.py)
        if labels is None:
            return ModelOutput(logits=self.lm_head(h), aux_loss=aux, routing=routing)
        targets = labels[:, 1:]                                        # position t predicts token t+1
        keep = targets != IGNORE_INDEX                                 # [B, T-1]
        # Causal attention: position t influences the predictions at t, t+1, ..., so it can carry an LM-loss
        # gradient iff some supervised prediction sits at or after it (STGC never counts the others: stgc.py).
        reaches = keep.flip(-1).cumsum(-1).flip(-1) > 0                # [B, T-1]
        reaches = torch.cat([reaches, reaches.new_zeros(reaches.shape[0], 1)], dim=1).reshape(-1)   # [B*T]
        for r in routing:
            r.reaches_loss = reaches
        logits = self.lm_head(h[:, :-1][keep]).float()                 # [n, V]
        n = keep.sum()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum") / n.clamp(min=1)
        return ModelOutput(loss=loss, num_tokens=n, aux_loss=aux, routing=routing)

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, max_new_tokens=128, eos_token_id=None,
                 repetition_penalty=1.0):
        """Batched greedy decoding. Give a list of prompts, `input_ids` (1-D id tensors or lists) or
        `inputs_embeds` ([T_i, D] tensors); they are left-padded here. Returns one list of new token
        ids per prompt, stopping at (and excluding) the first EOS, or after max_new_tokens.
        repetition_penalty != 1: HF's rule (a logit z of a token already generated becomes z / p if z > 0, else
        z * p) over the generated tokens only, as HF generate from inputs_embeds applies it (its input_ids start
        empty there): LLaVA-MoLE's evaluation uses 10 (docs/llava_mole.md §2)."""
        if inputs_embeds is None:
            device = self.embed_tokens.weight.device
            inputs_embeds = [self.embed_tokens(torch.as_tensor(ids, device=device)) for ids in input_ids]
        embeds, mask = pad_sequences(inputs_embeds, side="left")       # [B, T, D], [B, T]
        B, T, _ = embeds.shape
        eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                              device=embeds.device)
        cache = KVCache(self.cfg, B, T + max_new_tokens, embeds.dtype, embeds.device)
        seen = torch.zeros(B, self.cfg.vocab_size, dtype=torch.bool, device=embeds.device)   # generated so far

        def pick(logits_BV):
            if repetition_penalty != 1.0:
                penalised = torch.where(logits_BV > 0, logits_BV / repetition_penalty, logits_BV * repetition_penalty)
                logits_BV = torch.where(seen, penalised, logits_BV)
            tok = logits_BV.argmax(-1)                                 # [B]
            seen[torch.arange(B, device=tok.device), tok] = True
            return tok

        h, _ = self.hidden_states(inputs_embeds=embeds, attention_mask=mask, kv_cache=cache)
        next_tok = pick(self.lm_head(h[:, -1]))                        # [B]
        new = []
        done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
        for step in range(max_new_tokens):
            done = done | torch.isin(next_tok, eos)
            new.append(torch.where(done, -1, next_tok))                # -1 marks "finished"
            if step == max_new_tokens - 1 or bool(done.all()):         # one host sync per token
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            h, _ = self.hidden_states(input_ids=next_tok[:, None], attention_mask=mask, kv_cache=cache)
            next_tok = pick(self.lm_head(h[:, -1]))
        out = torch.stack(new, dim=1).tolist()                         # [B, n]
        return [row[:row.index(-1)] if -1 in row else row for row in out]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """An HF LLM dir, or the LLM part of a LLaVA / MoE-LLaVA checkpoint dir."""
        cfg = LMConfig.from_hf(_read_config(path))
        with torch.device("meta"):
            model = cls(cfg)
        sd = convert_state_dict(load_checkpoint(path, dtype), lm_key_map(cfg),
                                lm_ignored(cfg) + LLAVA_IGNORED + [r".*mm_projector\..*"], _expected(model), path)
        model.load_state_dict(_with_tied(model, sd), strict=True, assign=True)
        model.tie_weights()
        return routers_to_fp32(model).eval()


def pad_sequences(seqs, side, value=0.0):
    """Stack [T_i, ...] tensors into [B, T_max, ...] padded on `side`; also the [B, T_max] mask."""
    T = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), T, *seqs[0].shape[1:]), value)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        sl = slice(T - s.shape[0], T) if side == "left" else slice(0, s.shape[0])
        out[i, sl], mask[i, sl] = s, 1
    return out, mask

# -----------------------------------------------------------------------------
# 5. LLaVA: vision tower + projector + language model


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.lm.hidden_size, cfg.image_start_end)
        self.lm = LanguageModel(cfg.lm)

    def encode_images(self, images):                                   # [N, 3, H, W]
        # The tower is frozen in every paper stage; skip its graph unless someone unfroze it (demo).
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())):
            feats = self.vision_tower(images)                          # [N, P, C]
        feats = self.projector(feats.to(self.projector[0].weight.dtype))   # [N, P, D]
        if self.projector.start_token is not None:                     # LLaVA-MoLE: [start, features, end]
            N = feats.shape[0]
            feats = torch.cat([self.projector.start_token.to(feats.dtype).expand(N, 1, -1), feats,
                               self.projector.end_token.to(feats.dtype).expand(N, 1, -1)], dim=1)   # [N, P + 2, D]
        return feats

    def splice(self, ids_list, image_features, labels_list=None):
        """Per sample, replace each IMAGE_TOKEN_INDEX by the next image's P feature vectors.

        ids_list: 1-D id tensors without padding; image_features [N, P, D] in placeholder order across
        the batch. Returns the embeddings [T'_i, D] and labels [T'_i] (IGNORE_INDEX on image positions).
        """
        counts = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in ids_list]
        n_images = 0 if image_features is None else image_features.shape[0]
        if sum(counts) != n_images:
            raise ValueError(f"the batch has {sum(counts)} <image> placeholders (per sample: {counts}) "
                             f"but {n_images} images were given; each placeholder needs exactly one image")
        embeds, labels, next_image = [], [], 0
        for b, ids in enumerate(ids_list):
            text = self.lm.embed_tokens(ids.clamp(min=0))              # [T, D]; placeholder rows replaced below
            lab = labels_list[b] if labels_list is not None else torch.full_like(ids, IGNORE_INDEX)
            e_parts, l_parts, start = [], [], 0
            for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                feat = image_features[next_image]                      # [P, D]
                next_image += 1
                e_parts += [text[start:pos], feat.to(text.dtype)]
                l_parts += [lab[start:pos], lab.new_full((feat.shape[0],), IGNORE_INDEX)]
                start = pos + 1
            embeds.append(torch.cat(e_parts + [text[start:]]))
            labels.append(torch.cat(l_parts + [lab[start:]]))
        return embeds, labels

    def forward(self, input_ids, images=None, labels=None, attention_mask=None):
        """input_ids [B, T] right-padded, with IMAGE_TOKEN_INDEX placeholders; images [N, 3, H, W] in
        placeholder order; labels [B, T]; attention_mask [B, T] (None: no padding)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        ids_list = [input_ids[b][keep[b]] for b in range(input_ids.shape[0])]
        labels_list = None if labels is None else [labels[b][keep[b]] for b in range(labels.shape[0])]
        feats = self.encode_images(images) if images is not None and len(images) else None
        embeds, labs = self.splice(ids_list, feats, labels_list)
        if feats is None and torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters()):
            # A text-only batch still runs the projector on zero features, so a trainable projector gets a
            # (zero) gradient and DDP sees every parameter used (MoE-LLaVA's feat[0:0] trick, docs/moe_llava.md §1.10).
            empty = self.projector(self.projector[0].weight.new_zeros(0, self.cfg.vision.hidden_size)).sum()
            if self.projector.start_token is not None:                 # MoLE's start / end tokens likewise
                empty = empty + 0 * (self.projector.start_token.sum() + self.projector.end_token.sum())
            embeds[0] = embeds[0] + empty
        # Re-pad on the right; positions restart at 0 per sample (MoE-LLaVA llava_arch.py, docs/moe_llava.md §1.10).
        embeds, mask = pad_sequences(embeds, side="right")             # [B, T', D], [B, T']
        labs, _ = pad_sequences(labs, side="right", value=IGNORE_INDEX)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labs if labels is not None else None)

    @torch.no_grad()
    def generate(self, input_ids, images=None, max_new_tokens=128, eos_token_id=None, repetition_penalty=1.0):
        """input_ids: a list of 1-D prompts (ids or tensors, unpadded, with placeholders); images
        [N, 3, H, W] in placeholder order. Returns one list of new token ids per prompt."""
        device = self.lm.embed_tokens.weight.device
        ids_list = [torch.as_tensor(ids, device=device) for ids in input_ids]
        feats = self.encode_images(images.to(device)) if images is not None and len(images) else None
        embeds, _ = self.splice(ids_list, feats)
        return self.lm.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                repetition_penalty=repetition_penalty)

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=torch.float32):
        """A LLaVA / MoE-LLaVA checkpoint dir (LLM + mm_projector keys) and the vision tower's own HF dir.
        The checkpoint's config names the tower by hub id (mm_image_tower / mm_vision_tower); nothing is
        downloaded here, so pass the local dir of that tower. A dir written by `save_pretrained` (ours:
        config.json with "format": "moe-vlm", the tower inside) needs no vision_tower."""
        hf = _read_config(path)
        if hf.get("format") == OUR_FORMAT:
            return cls.load_ours(path, hf, dtype)
        tower_id = hf.get("mm_image_tower") or hf.get("mm_vision_tower")
        vision_tower = vision_tower or (tower_id if tower_id and os.path.isdir(tower_id) else None)
        if vision_tower is None:
            raise ValueError(f"{path}: its vision tower is {tower_id!r}; download it and pass vision_tower=LOCAL_DIR")
        vcfg = VisionConfig.from_hf(_read_config(vision_tower), select_layer=hf.get("mm_vision_select_layer", -2),
                                    select_feature=hf.get("mm_vision_select_feature", "patch"))
        projector = hf.get("image_projector_type") or hf.get("mm_projector_type") or "linear"
        cfg = LlavaConfig(vision=vcfg, lm=LMConfig.from_hf(hf), projector=projector)
        with torch.device("meta"):
            model = cls(cfg)
        expected = _expected(model)
        prefix = lambda v: tuple("lm." + x for x in v) if isinstance(v, tuple) else "lm." + v
        key_map = {k: prefix(v) for k, v in lm_key_map(cfg.lm).items()} | projector_key_map(cfg.lm)
        sd = convert_state_dict(load_checkpoint(path, dtype), key_map, lm_ignored(cfg.lm) + LLAVA_IGNORED,
                                {k: v for k, v in expected.items() if not k.startswith("vision_tower.")}, path)
        sd |= {"vision_tower." + k: v for k, v in convert_state_dict(
            load_checkpoint(vision_tower, dtype), vision_key_map(vcfg), VISION_IGNORED + _skipped_vision_layers(vcfg),
            {k[len("vision_tower."):]: v for k, v in expected.items() if k.startswith("vision_tower.")},
            vision_tower).items()}
        model.load_state_dict(_with_tied(model, sd), strict=True, assign=True)
        model.lm.tie_weights()
        return routers_to_fp32(model).eval()

    def save_pretrained(self, path, extra_config=None, state_dict=None):
        """Our format: config.json {"format": "moe-vlm", "llava": LlavaConfig, **extra_config} and
        model.safetensors under our parameter names; a tied lm_head is stored once (as the embedding).
        state_dict: a full state dict gathered elsewhere (FSDP), else this module's."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"format": OUR_FORMAT, "llava": asdict(self.cfg)} | (extra_config or {}), f, indent=2)
        sd = dict(self.state_dict() if state_dict is None else state_dict)
        if self.cfg.lm.tie_embeddings:
            sd.pop("lm.lm_head.weight")
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))

    @classmethod
    def load_ours(cls, path, config, dtype=torch.float32):
        from safetensors.torch import load_file
        with torch.device("meta"):
            model = cls(LlavaConfig(**config["llava"]))
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        moe = model.cfg.lm.moe
        if moe is not None and moe.kind == "lora" and moe.num_experts == 1:
            sd = plain_lora_v1(sd)
        model.load_state_dict(_with_tied(model, sd), strict=True, assign=True)   # errors name any bad key
        model.lm.tie_weights()
        return routers_to_fp32(model).eval()


OUR_FORMAT = "moe-vlm"

# Plain LoRA (train.stage 'lora') was saved before issue 17 as a one-expert LoRAExperts: the dense MLP under `base`,
# each projection's adapter as [1, ...] stacks. Now each projection is a LoRALinear. One strict key map reads the old
# layout (any other key passes unchanged, and load_state_dict(strict=True) names whatever is left over).
PLAIN_LORA_V1 = {r"lm\.layers\.(\d+)\.mlp\.base\.(\w+)\.(weight|bias)": r"lm.layers.\1.mlp.\2.base.\3",
                 r"lm\.layers\.(\d+)\.mlp\.lora_([AB])\.(\w+)": r"lm.layers.\1.mlp.\3.lora_\2"}


def plain_lora_v1(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        old = next((pattern for pattern in PLAIN_LORA_V1 if re.fullmatch(pattern, k)), None)
        if old is None:
            out[k] = v
            continue
        if ".lora_" in k and (v.dim() != 3 or v.shape[0] != 1):
            raise ValueError(f"{k}: shape {tuple(v.shape)} is not one expert's [1, ...] stack of plain LoRA")
        out[re.sub(old, PLAIN_LORA_V1[old], k)] = v[0] if ".lora_" in k else v
    return out

# -----------------------------------------------------------------------------
# 6. Initialisation (models trained from scratch, e.g. the demo; loading overwrites all of it)


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)

# -----------------------------------------------------------------------------
# 7. Checkpoint loading: one strict key map per family, '{}' = layer index.
# HF name -> our name; a tuple of our names means "split the HF tensor into equal chunks along dim 0".

def lm_key_map(cfg: LMConfig) -> dict:
    if cfg.family == "qwen":   # Qwen-1: everything under transformer., fused c_attn, MLP c_proj(w1(x) * silu(w2(x)))
        return with_moe_keys({
            "transformer.wte.weight": "embed_tokens.weight",
            "transformer.h.{}.ln_1.weight": "layers.{}.attn_norm.weight",
            "transformer.h.{}.attn.c_attn.weight": ("layers.{}.attn.q_proj.weight", "layers.{}.attn.k_proj.weight", "layers.{}.attn.v_proj.weight"),
            "transformer.h.{}.attn.c_attn.bias": ("layers.{}.attn.q_proj.bias", "layers.{}.attn.k_proj.bias", "layers.{}.attn.v_proj.bias"),
            "transformer.h.{}.attn.c_proj.weight": "layers.{}.attn.o_proj.weight",
            "transformer.h.{}.ln_2.weight": "layers.{}.mlp_norm.weight",
            "transformer.h.{}.mlp.w1.weight": "layers.{}.mlp.up_proj.weight",
            "transformer.h.{}.mlp.w2.weight": "layers.{}.mlp.gate_proj.weight",
            "transformer.h.{}.mlp.c_proj.weight": "layers.{}.mlp.down_proj.weight",
            "transformer.ln_f.weight": "norm.weight",
            "lm_head.weight": "lm_head.weight",
        })
    # Llama / Mistral / Qwen2 / StableLM share HF names; Phi-2 renames o_proj, the MLP and the final norm.
    o_proj, final_norm = ("dense", "final_layernorm") if cfg.family == "phi" else ("o_proj", "norm")
    mlp = ("fc1", "fc2") if cfg.mlp == "gelu" else ("gate_proj", "up_proj", "down_proj")
    m = {"model.embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "lm_head.weight",
         "lm_head.bias": "lm_head.bias"}
    for wb in ("weight", "bias"):
        m |= {f"model.layers.{{}}.input_layernorm.{wb}": f"layers.{{}}.attn_norm.{wb}",
              f"model.layers.{{}}.post_attention_layernorm.{wb}": f"layers.{{}}.mlp_norm.{wb}",
              f"model.layers.{{}}.self_attn.{o_proj}.{wb}": f"layers.{{}}.attn.o_proj.{wb}",
              f"model.{final_norm}.{wb}": f"norm.{wb}"}
        m |= {f"model.layers.{{}}.self_attn.{p}.{wb}": f"layers.{{}}.attn.{p}.{wb}" for p in ("q_proj", "k_proj", "v_proj")}
        m |= {f"model.layers.{{}}.mlp.{p}.{wb}": f"layers.{{}}.mlp.{p}.{wb}" for p in mlp}
    return with_moe_keys(m)


def with_moe_keys(m: dict) -> dict:
    """Add MoE-LLaVA's DeepSpeed MoE names (docs/moe_llava.md §2.2) for every dense MLP entry:
    '...mlp.deepspeed_moe.gate.wg.weight' is the router, '...mlp.deepspeed_moe.experts.deepspeed_experts.{k}.P'
    is slot k of our stacked expert tensor '...mlp.experts.P' (written 'name[{}]')."""
    out = dict(m)
    for hf, ours in m.items():
        if ".mlp." in hf and isinstance(ours, str):
            out[hf.replace(".mlp.", ".mlp.deepspeed_moe.experts.deepspeed_experts.{}.")] = \
                ours.replace(".mlp.", ".mlp.experts.") + "[{}]"
            root = hf.split(".mlp.")[0]
            out[root + ".mlp.deepspeed_moe.gate.wg.weight"] = ours.split(".mlp.")[0] + ".mlp.router.weight"
    return out


def projector_key_map(cfg: LMConfig) -> dict:
    """MoE-LLaVA: {model|transformer}.mm_projector.image_spatial_proj.{0,2}; LLaVA-1.5: model.mm_projector.{0,2}
    (a linear projector is saved without the index)."""
    root = "transformer" if cfg.family == "qwen" else "model"
    m = {}
    for wb in ("weight", "bias"):
        m |= {f"{root}.mm_projector.image_spatial_proj.{{}}.{wb}": f"projector.{{}}.{wb}",
              f"{root}.mm_projector.{{}}.{wb}": f"projector.{{}}.{wb}",
              f"{root}.mm_projector.image_spatial_proj.{wb}": f"projector.0.{wb}",
              f"{root}.mm_projector.{wb}": f"projector.0.{wb}"}
    return m


def vision_key_map(cfg: VisionConfig) -> dict:
    """CLIP/SigLIP vision names; a leading 'vision_model.' (full CLIPModel / older saves) is stripped first."""
    m = {"embeddings.class_embedding": "class_embedding",
         "embeddings.position_embedding.weight": "pos_embed",
         "embeddings.patch_embedding.weight": "patch_embed.weight",
         "embeddings.patch_embedding.bias": "patch_embed.bias",
         "pre_layrnorm.weight": "pre_norm.weight", "pre_layrnorm.bias": "pre_norm.bias"}
    for wb in ("weight", "bias"):
        m |= {f"encoder.layers.{{}}.layer_norm1.{wb}": f"layers.{{}}.attn_norm.{wb}",
              f"encoder.layers.{{}}.layer_norm2.{wb}": f"layers.{{}}.mlp_norm.{wb}",
              f"encoder.layers.{{}}.self_attn.out_proj.{wb}": f"layers.{{}}.o_proj.{wb}",
              f"encoder.layers.{{}}.mlp.fc1.{wb}": f"layers.{{}}.fc1.{wb}",
              f"encoder.layers.{{}}.mlp.fc2.{wb}": f"layers.{{}}.fc2.{wb}"}
        m |= {f"encoder.layers.{{}}.self_attn.{p}.{wb}": f"layers.{{}}.{p}.{wb}" for p in ("q_proj", "k_proj", "v_proj")}
    return m


# Checkpoint keys that are known and deliberately not loaded (regexes over the HF name).
def lm_ignored(cfg: LMConfig):
    rope = [r".*rotary_emb\.inv_freq"]                                  # a buffer; recomputed
    return rope + ([r"lm_head\.weight"] if cfg.tie_embeddings else [])  # tied: the embedding is the head


LLAVA_IGNORED = [r".*\.(image|vision)_tower\.(image|vision)_tower\..*"]   # MoE-LLaVA / LLaVA save the tower; it
                                                                          # loads from its own dir (docs/moe_llava.md §2.1)
VISION_IGNORED = [r"text_model\..*", r"(text|visual)_projection\..*", r"logit_(scale|bias)",  # full CLIP/SigLIP
                  r"embeddings\.position_ids", r"post_layernorm\..*",  # features come before post-LN
                  r"head\..*"]                                         # SigLIP pooling head: unused


def _skipped_vision_layers(cfg: VisionConfig):
    """Blocks after select_layer are never run, so they are not built and their keys are skipped."""
    return [rf"encoder\.layers\.{i}\..*" for i in range(cfg.num_layers_run, cfg.num_layers)]


def _read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: point at a local HF checkpoint dir (nothing is downloaded)")
    with open(file) as f:
        return json.load(f)


def load_checkpoint(path, dtype=torch.float32) -> dict:
    """All tensors of an HF checkpoint dir, floating ones cast to dtype. Reads model.safetensors,
    sharded safetensors (model.safetensors.index.json), or pytorch_model.bin (sharded too) with
    torch.load(weights_only=True): a pickle that holds code is refused, never run."""
    from safetensors import safe_open
    files = None
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
        if os.path.isfile(os.path.join(path, single)):
            files = [single]
            break
    if files is None:
        raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                tensors |= {k: cast(f.get_tensor(k)) for k in f.keys()}
        else:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{file}: refused to load (weights_only=True): {str(e).splitlines()[0]}") from None
            tensors |= {k: cast(v) for k, v in sd.items()}
    return tensors


def convert_state_dict(hf_sd: dict, key_map: dict, ignored: list, expected: dict, where, optional=()) -> dict:
    """Rename HF tensors to ours through key_map, strictly: every HF key is mapped or matches an
    `ignored` regex, every expected key is produced (but those in `optional`, which the caller fills from
    elsewhere), and every shape agrees; else an error naming the key."""
    out, slots = {}, {}
    ignored_re = re.compile("|".join(f"(?:{p})" for p in ignored) or "(?!)")
    for hf_key, t in hf_sd.items():
        if hf_key.startswith("vision_model."):                           # full CLIPModel / pre-v5 saves
            hf_key = hf_key[len("vision_model."):]
        if ignored_re.fullmatch(hf_key):
            continue
        indices = re.findall(r"\.(\d+)(?=\.|$)", hf_key)                  # layer (and expert) indices
        target = key_map.get(re.sub(r"\.(\d+)(?=\.|$)", ".{}", hf_key))
        if target is None:
            raise KeyError(f"{where}: unexpected checkpoint key {hf_key!r} (not in the key map of this architecture)")
        names = [k.format(*indices) for k in (target if isinstance(target, tuple) else (target,))]
        parts = t.chunk(len(names), dim=0) if len(names) > 1 else (t,)
        for name, part in zip(names, parts):
            slot = None
            if name.endswith("]"):                                       # 'x.weight[2]': slot 2 of stacked 'x.weight'
                name, slot = name[:-1].split("[")
            if name not in expected:
                raise KeyError(f"{where}: checkpoint key {hf_key!r} -> {name!r}, which this config does not have "
                               "(a bias the config says is absent, or an MoE layer it does not place here)")
            if slot is not None:
                slots.setdefault(name, {})[int(slot)] = part
                continue
            if tuple(part.shape) != tuple(expected[name].shape):
                raise ValueError(f"{where}: shape mismatch for {hf_key!r}: checkpoint {tuple(part.shape)}, "
                                 f"model {name!r} {tuple(expected[name].shape)}")
            out[name] = part.contiguous()
    for name, parts in slots.items():                                    # stack the experts
        n = expected[name].shape[0]
        if sorted(parts) != list(range(n)):
            raise KeyError(f"{where}: {name!r} needs experts 0..{n - 1}, checkpoint has {sorted(parts)}")
        out[name] = torch.stack([parts[e] for e in range(n)])
        if out[name].shape != expected[name].shape:
            raise ValueError(f"{where}: shape mismatch for experts of {name!r}: checkpoint "
                             f"{tuple(out[name].shape)}, model {tuple(expected[name].shape)}")
    optional = set(optional)
    missing = [k for k in expected if k not in out and k not in optional]
    if missing:
        raise KeyError(f"{where}: missing checkpoint keys for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out


def to_hf_state_dict(model) -> dict:
    """Our LanguageModel / LlavaModel weights under HF / MoE-LLaVA names: the key maps inverted, experts
    unstacked into deepspeed_experts.{k}, Qwen-1's q/k/v fused back into c_attn. The vision tower is left
    out: MoE-LLaVA loads it from its own dir (docs/moe_llava.md §2.1). MoLE / LoRA weights have no HF layout."""
    lm = model if isinstance(model, LanguageModel) else model.lm
    if isinstance(model, LanguageModel):
        key_map = lm_key_map(lm.cfg)
    else:
        prefix = lambda v: tuple("lm." + x for x in v) if isinstance(v, tuple) else "lm." + v
        key_map = {k: prefix(v) for k, v in lm_key_map(lm.cfg).items()} | projector_key_map(lm.cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
    if lm.cfg.tie_embeddings:
        sd.pop("lm.lm_head.weight" if model is not lm else "lm_head.weight")
    reverse = {}                      # our template -> (HF template, our target); first entry wins
    for hf, ours in key_map.items():
        for i, o in enumerate(ours if isinstance(ours, tuple) else (ours,)):
            reverse.setdefault(o.removesuffix("[{}]"), (hf, ours) if i == 0 else (None, None))
    out = {}
    for name, t in sd.items():
        indices = re.findall(r"\.(\d+)(?=\.|$)", name)
        hf, ours = reverse.get(re.sub(r"\.(\d+)(?=\.|$)", ".{}", name), ("?", None))
        if hf == "?":
            raise KeyError(f"{name!r} has no HF / MoE-LLaVA name (MoLE and LoRA weights exist only in our format)")
        if hf is None:                                                   # fused into the first part's key
            continue
        if isinstance(ours, tuple):
            out[hf.format(*indices)] = torch.cat([sd[o.format(*indices)] for o in ours])
        elif ours.endswith("[{}]"):
            out |= {hf.format(*indices, e): t[e] for e in range(t.shape[0])}
        else:
            out[hf.format(*indices)] = t
    return out


def _expected(model):
    """Parameters/buffers a checkpoint must provide; a tied lm_head comes from the embedding."""
    sd = model.state_dict()
    for prefix, lm in (("", model), ("lm.", getattr(model, "lm", None))):
        if isinstance(lm, LanguageModel) and lm.cfg.tie_embeddings:
            sd.pop(prefix + "lm_head.weight", None)
    return sd


def _with_tied(model, sd):
    lm, prefix = (model, "") if isinstance(model, LanguageModel) else (model.lm, "lm.")
    if lm.cfg.tie_embeddings:
        sd[prefix + "lm_head.weight"] = sd[prefix + "embed_tokens.weight"]
    return sd

# -----------------------------------------------------------------------------
# 8. LLaVA-MoLE's released checkpoint (docs/llava_mole.md §5): a torch.save'd {"state_dict": ...} under the module
# names of its code, loaded there with strict=False, so it may hold only the trainable tensors. Those (expert and
# attention LoRA, routers, projector, start / end tokens) must all be in the file; the frozen Vicuna and CLIP
# weights are taken from the file where it has them, else from their own HF dirs (which also give the configs).

MOLE_LLM = "llm_model.base_model.model."                              # peft's wrapping of LlamaForCausalLM
MOLE_PROJECTIONS = ("gate", "up", "down")


def mole_release_key_map(cfg: "LlavaConfig") -> dict:
    """Released name -> ours; '{}' = layer (then expert) index, 'x[{}]' = slot {} of our stacked expert tensor."""
    L = MOLE_LLM + "model.layers.{}."
    m = {MOLE_LLM + "model.embed_tokens.weight": "lm.embed_tokens.weight",
         MOLE_LLM + "model.norm.weight": "lm.norm.weight",
         MOLE_LLM + "lm_head.weight": "lm.lm_head.weight",
         L + "input_layernorm.weight": "lm.layers.{}.attn_norm.weight",
         L + "post_attention_layernorm.weight": "lm.layers.{}.mlp_norm.weight",
         L + "mlp.router.weight": "lm.layers.{}.mlp.router.weight",
         L + "mlp.router.bias": "lm.layers.{}.mlp.router.bias",
         "in_adaptor.visual_start_token": "projector.start_token",
         "in_adaptor.visual_end_token": "projector.end_token"}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for base in ("weight", "base_layer.weight"):                   # peft's two spellings of the frozen weight
            m[L + f"self_attn.{p}.{base}"] = f"lm.layers.{{}}.attn.{p}.base.weight"
        for ab in ("A", "B"):
            m[L + f"self_attn.{p}.lora_{ab}.default.weight"] = f"lm.layers.{{}}.attn.{p}.lora_{ab}"
    for p in MOLE_PROJECTIONS:
        m[L + f"mlp.original_module.{p}_proj.weight"] = f"lm.layers.{{}}.mlp.base.{p}_proj.weight"
        for ab in ("A", "B"):                                          # expert e's [r, in] / [out, r]
            m[L + f"mlp.moe_{p}.{{}}.lora_{ab}"] = f"lm.layers.{{}}.mlp.lora_{ab}.{p}_proj[{{}}]"
    for wb in ("weight", "bias"):
        m[f"in_adaptor.projector.{{}}.{wb}"] = f"projector.{{}}.{wb}"
    m |= {"vit.vision_tower.vision_model." + k: "vision_tower." + v for k, v in vision_key_map(cfg.vision).items()}
    return m


MOLE_IGNORED = [r".*rotary_emb\.inv_freq"] + [r"vit\.vision_tower\.vision_model\." + p for p in VISION_IGNORED]


def read_mole_release(path) -> dict:
    """The released file's state_dict, read with torch.load(weights_only=True): a pickle holding code is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: refused to load (weights_only=True): {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise KeyError(f"{path}: not a LLaVA-MoLE release file (a dict with 'state_dict'); it holds {keys}")
    return obj["state_dict"]


def mole_release_shapes(sd: dict, path) -> dict:
    """Experts, MoE layers, rank and attention rank, read from the tensors (the file name can disagree: §1)."""
    experts = [re.search(rf"layers\.(\d+)\.mlp\.moe_{MOLE_PROJECTIONS[0]}\.(\d+)\.lora_A$", k) for k in sd]
    experts = [(int(m[1]), int(m[2])) for m in experts if m]
    if not experts:
        raise KeyError(f"{path}: no expert LoRA keys ('...mlp.moe_gate.{{e}}.lora_A'): not a LLaVA-MoLE state_dict")
    rank = next(v.shape[0] for k, v in sd.items() if re.search(r"\.mlp\.moe_gate\.\d+\.lora_A$", k))
    attn = [v.shape[0] for k, v in sd.items() if k.endswith("self_attn.q_proj.lora_A.default.weight")]
    return {"num_experts": 1 + max(e for _, e in experts), "layers": sorted({i for i, _ in experts}),
            "rank": rank, "attn_rank": attn[0] if attn else 0}


def load_mole_release(path, llm, vision_tower, alpha=None, mixture="soft", top1_gate="one", dtype=torch.float32,
                      log=print):
    """A LlavaModel with LLaVA-MoLE's released semantics (router bias, `mixture` = 'soft' as its inference runs,
    or 'top1' with `top1_gate`; last-layer CLIP features; start / end tokens; the released balance loss) and its
    weights. llm / vision_tower: the local HF dirs of Vicuna-7B-v1.5 and CLIP ViT-L/14-336. The rank comes from
    the tensor shapes; alpha from the argument, else the file name's 'a<alpha>' ('llava_mole_r16_a32_e3.pt'),
    else it is an error; the log line says which."""
    sd = read_mole_release(path)
    shape = mole_release_shapes(sd, path)
    name = os.path.basename(str(path))
    if alpha is None:
        found = re.search(r"(?:^|_)a(\d+(?:\.\d+)?)(?=[_.])", name)
        if found is None:
            raise ValueError(f"{path}: no alpha in the file name (like 'a32'); pass alpha=")
        alpha, why = float(found[1]), f"from the file name {name!r}"
    else:
        alpha, why = float(alpha), "given"
    named_rank = re.search(r"(?:^|_)r(\d+)(?=[_.])", name)
    note = "" if named_rank is None or int(named_rank[1]) == shape["rank"] else f" (the file name says r{named_rank[1]})"
    log(f"LLaVA-MoLE release {path}: {shape['num_experts']} experts on {len(shape['layers'])} layers, rank "
        f"{shape['rank']} from the tensor shapes{note}, attention LoRA rank {shape['attn_rank']}, alpha {alpha:g} "
        f"{why}: LoRA scale {alpha / shape['rank']:g}; mixture {mixture!r}" + (f", top-1 gate {top1_gate!r}" if mixture == "top1" else ""))
    tower = VisionTower.from_pretrained(vision_tower, dtype, select_layer=-1)   # released: hidden_states[-1]
    lm = LanguageModel.from_pretrained(llm, dtype)
    n_layers = lm.cfg.num_layers
    moe = MoEConfig(kind="lora", num_experts=shape["num_experts"], top_k=1, lora_rank=shape["rank"], lora_alpha=alpha,
                    lora_dropout=0.05, attn_lora_rank=shape["attn_rank"], mole_router_bias=True, mole_mixture=mixture,
                    mole_top1_gate=top1_gate, mole_balance="released",
                    layers="dense" if shape["layers"] == list(range(n_layers)) else shape["layers"])
    lm.install_moe(moe)
    with torch.device("meta"):
        model = LlavaModel(LlavaConfig(vision=tower.cfg, lm=lm.cfg, projector="mlp2x_gelu", image_start_end=True))
    model.vision_tower, model.lm = tower, lm
    expected = _expected(model)
    frozen = [k for k in expected if not (k.startswith("projector.") or k.startswith("lm.") and is_moe_trainable(k[3:], "lora"))]
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    ours = convert_state_dict(cast, mole_release_key_map(model.cfg), MOLE_IGNORED, expected, path, optional=frozen)
    from_dirs = {k: expected[k] for k in frozen if k not in ours}     # the tower's and Vicuna's own weights
    log(f"  {len(ours)} tensors from the file, {len(from_dirs)} frozen ones from {llm} and {vision_tower}")
    model.load_state_dict(_with_tied(model, ours | from_dirs), strict=True, assign=True)
    model.lm.tie_weights()
    return routers_to_fp32(model).eval()


# -----------------------------------------------------------------------------
# Smoke run (`python model.py`): a tiny random CLIP-shaped tower + projector + StableLM-shaped
# decoder, one training forward and one batched generation. The real demo arrives in Step 7.

if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                          num_layers=3, num_heads=4),
                      lm=LMConfig(family="stablelm", vocab_size=256, hidden_size=96, intermediate_size=192,
                                  num_layers=4, num_heads=4, norm="layernorm", norm_eps=1e-5,
                                  qkv_bias=True, partial_rotary_factor=0.25))
    model = LlavaModel(cfg)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7, 8], [2, IMAGE_TOKEN_INDEX, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.where(mask.bool() & (torch.arange(6) >= 3), ids, IGNORE_INDEX)
    out = model(ids, torch.randn(2, 3, 32, 32), labels=labels, attention_mask=mask)
    out.loss.backward()
    print(f"LlavaModel: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{cfg.vision.num_features} image tokens per image; loss {out.loss.item():.3f} over {int(out.num_tokens)} tokens")
    gen = model.eval().generate([[1, IMAGE_TOKEN_INDEX, 5], [3, 4]], torch.randn(1, 3, 32, 32), max_new_tokens=5)
    print("greedy tokens:", gen)

# -----------------------------------------------------------------------------
# 9. Run dirs and processes: what train.py and eval.py share


def latest_checkpoint(path):
    """A step_* dir as given, or the one a run dir's (or its 'latest' file's) pointer names (train.py writes it)."""
    if os.path.basename(path) == "latest" and os.path.isfile(path):
        path = os.path.dirname(path)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    return path


def saved_moe_config(path) -> tuple:
    """(MoEConfig or None, number of decoder layers) of the checkpoint dir `path` (ours, an HF LLM, a LLaVA or
    MoE-LLaVA dir), read from its config.json alone: which MoE layers loading it will build."""
    cfg = _read_config(path)
    lm = LlavaConfig(**cfg["llava"]).lm if cfg.get("format") == OUR_FORMAT else LMConfig.from_hf(cfg)
    return lm.moe, lm.num_layers


def setup_distributed():
    """(rank, world, device) from torchrun's environment, the process group joined once (NCCL on CUDA, else
    gloo); (0, 1, cuda or cpu) in a plain process. A one-process torchrun joins no group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if "LOCAL_RANK" not in os.environ:
        return rank, world, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")
