"""Real-size memory plan without a GPU: for each paper preset, the model built at full size on the meta device
(no memory is allocated), its parameter counts, FLOPs per sample, and a per-GPU memory model for the preset's
micro-batch, sequence length, parallelism and activation checkpointing, against an 80 GB card.

    .venv/bin/python bench/memory_plan.py                  # the table; writes the memory_plan block of RESULTS.md
    .venv/bin/python bench/memory_plan.py --no-write       # print only
    .venv/bin/python bench/memory_plan.py --preset configs/moe_llava_qwen.toml --train.micro_batch_size=4   # what-if
                                                           # (--preset, --positions, overrides: print only)

What is computed, and what is measured:
  parameters     counted on the meta-device model that train.py's own build_model and set_trainable produce
                 (stage II: LLM + projector train; III: every FFN + routers + projector; MoLE: LoRA + routers
                 + projector), so the trainable set is the stage's real one.
  static memory  bytes per parameter under train.py's setup (fp32 master weights, bf16 autocast on CUDA, AdamW):
                 DDP: 4 (weights, all of them) + per trainable 4 (grad, a view into DDP's buckets: train.py sets
                 gradient_as_bucket_view) + 8 (AdamW exp_avg, exp_avg_sq);
                 plus the bf16 weight copies autocast makes (section 3). FSDP2 (train.apply_fsdp): the same
                 divided over the 8 ranks, plus the unsharded bf16 root (embeddings, lm_head, projector), two
                 unsharded decoder blocks (the one computing and the one prefetched), and, when a step
                 accumulates micro-batches, FSDP2's unsharded fp32 gradient accumulator (section 4).
  activations    a model of what autograd saves for backward, derived op by op from model.py / moe.py's forward
                 under bf16 autocast (section 3), with and without activation checkpointing. It is checked
                 against a measurement: at a tiny size of every preset's structure, one training forward on CPU
                 under torch.autocast("cpu", bfloat16) with torch.autograd.graph.saved_tensors_hooks summing the
                 distinct storages saved (section 5); the script prints how far the two agree (the tests hold
                 them to 1%). The peak adds transients the hooks cannot see (the logits' gradients, one block's
                 backward): estimates, whose one constant (WORKSPACE) was read off the CPU profiler's allocation
                 peak at a small size, so that comparison is a consistency check, not an independent one.
                 FSDP2 computes with bf16 parameters, which makes the residual stream partly bf16: the model (fp32
                 master weights, DDP) is then an upper bound, by how much the check also measures.
  FLOPs          train.flops_per_step (6 x active parameters per token + attention + the frozen tower).

Assumptions, stated once: 8 GPUs; one sample = one image + text cut at data.max_length input ids, so the longest
sample has max_length - 1 + 576 = 2623 LM positions (the <image> id becomes 576 features), and every sample of
the micro-batch is that long (the worst batch the length-grouped sampler can form); 75% of its text positions
are supervised answer tokens (only those go through lm_head); an 80 GB card has 79.3 GiB (what torch reports for
an A100/H100 80GB) and "fits" leaves 8 GiB of it for the CUDA context, NCCL buffers and allocator fragmentation.
The MoE experts take moe.py's grouped path (H100/H200, bf16); on A100 moe.dispatch_path picks the capacity-padded
path, whose expert buffers are capacity_factor (1.5x) larger. Nothing here was measured on a GPU.
"""
import argparse
import math
import os
from dataclasses import dataclass, field, replace

os.environ.setdefault("KINETO_LOG_LEVEL", "5")   # before torch loads: no "gpuGetDeviceCount failed" from section 5

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402  (puts the repo root on sys.path)
from common import header, set_cpu_threads, update_results  # noqa: E402
from model import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, Attention, LlavaConfig, LMConfig, RMSNorm, SwiGLU,  # noqa: E402
                   VisionConfig)
from moe import FFN_PROJECTIONS, LoRAExperts, LoRALinear, MoELayer, routers_to_fp32  # noqa: E402
from train import InitConfig, build_model, flops_per_step, load_config, set_trainable  # noqa: E402

GiB = 2 ** 30
CARD = 79.3 * GiB          # an "80 GB" A100 / H100 as torch.cuda.get_device_properties reports it
RESERVE = 8 * GiB          # CUDA context, NCCL buffers, allocator fragmentation: never available to tensors
WORLD = 8
SUPERVISED = 0.75          # fraction of a sample's text positions that are answer tokens (through lm_head)
LOW, F32 = 2, 4            # bytes: bf16 (autocast's matmul dtype) and fp32 (residual stream, norms, router, loss)
WORKSPACE = 0.3            # a block's backward needs this fraction of what it saved on top (the CPU profiler's
                           # peak at a small size: 0-12% without checkpointing, 0-26% with it); an estimate

# -----------------------------------------------------------------------------
# 1. The real sizes: the HF config.json of each base model, as model.py's LMConfig / VisionConfig


def stablelm_2_1_6b():
    """stabilityai/stablelm-2-1_6b: vocab 100352, hidden 2048, intermediate 5632, 24 layers, 32 heads (no GQA),
    LayerNorm eps 1e-5, use_qkv_bias, partial_rotary_factor 0.25, untied embeddings."""
    return LMConfig(family="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_layers=24,
                    num_heads=32, norm="layernorm", norm_eps=1e-5, qkv_bias=True, partial_rotary_factor=0.25)


def qwen_1_8b():
    """Qwen/Qwen-1_8B (Qwen-1): vocab 151936, hidden 2048, intermediate 11008 stored = 5504 per SwiGLU branch,
    24 layers, 16 heads of kv_channels 128, RMSNorm eps 1e-6, c_attn bias, no other bias, seq_length 8192."""
    return LMConfig(family="qwen", vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_layers=24,
                    num_heads=16, head_dim=128, norm="rmsnorm", norm_eps=1e-6, qkv_bias=True,
                    max_position_embeddings=8192)


def phi_2():
    """microsoft/phi-2: vocab 51200, hidden 2560, intermediate 10240, 32 layers, 32 heads, LayerNorm eps 1e-5,
    gelu_new MLP, parallel attention + MLP block, biases everywhere, partial_rotary_factor 0.4. MoE-LLaVA builds
    its lm_head without the bias (model.py LMConfig.from_hf)."""
    return LMConfig(family="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_layers=32,
                    num_heads=32, norm="layernorm", norm_eps=1e-5, mlp="gelu", act="gelu_new", parallel_block=True,
                    qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=False, partial_rotary_factor=0.4,
                    max_position_embeddings=2048)


def vicuna_7b():
    """lmsys/vicuna-7b-v1.5 (Llama-2-7B): vocab 32000, hidden 4096, intermediate 11008, 32 layers, 32 heads,
    RMSNorm eps 1e-5, no biases."""
    return LMConfig(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, norm="rmsnorm", norm_eps=1e-5)


def clip_l_336(select_layer=-2):
    """openai/clip-vit-large-patch14-336: 336 px, patch 14 (576 patches + class token), width 1024, MLP 4096,
    24 layers, 16 heads; select_layer -2 runs (and builds) 23 of the 24 blocks."""
    return VisionConfig(select_layer=select_layer)


PRESETS = [   # (row name, preset file (base+overlay: train.py --config base --config overlay), its LLM)
    ("MoE-LLaVA-StableLM-1.6B×4 (III)", "moe_llava_stablelm.toml", stablelm_2_1_6b),
    ("MoE-LLaVA-StableLM-1.6B×4 (III) + STGC", "moe_llava_stablelm.toml+stgc.toml", stablelm_2_1_6b),
    ("StableLM-1.6B (II)", "moe_llava_stablelm_stage2.toml", stablelm_2_1_6b),
    ("MoE-LLaVA-Qwen-1.8B×4 (III)", "moe_llava_qwen.toml", qwen_1_8b),
    ("MoE-LLaVA-Qwen-1.8B×4 (III) + STGC", "moe_llava_qwen.toml+stgc.toml", qwen_1_8b),
    ("Qwen-1.8B (II)", "moe_llava_qwen_stage2.toml", qwen_1_8b),
    ("MoE-LLaVA-Phi-2-2.7B×4 (III)", "moe_llava_phi2.toml", phi_2),
    ("MoE-LLaVA-Phi-2-2.7B×4 (III) + STGC", "moe_llava_phi2.toml+stgc.toml", phi_2),
    ("Phi-2-2.7B (II)", "moe_llava_phi2_stage2.toml", phi_2),
    ("LLaVA-MoLE Vicuna-7B", "mole_llava15.toml", vicuna_7b),
]
# MoE-LLaVA Table 1 (total / activated parameters of the LLM, embeddings included, vision tower excluded)
PAPER = {"moe_llava_stablelm.toml": (2.9e9, 2.0e9), "moe_llava_qwen.toml": (3.1e9, 2.2e9),
         "moe_llava_phi2.toml": (5.3e9, 3.6e9)}
CONFIGS = os.path.join(common.ROOT, "configs")

# -----------------------------------------------------------------------------
# 2. The preset at full size on the meta device


def preset_files(preset) -> list:
    """'base.toml+overlay.toml' (names under configs/, or paths) -> the files train.py's --config would layer."""
    return [p if os.path.isfile(p) else os.path.join(CONFIGS, p) for p in preset.split("+")]


def build(preset, lm_fn, overrides=(), device="meta", vision=None):
    """train.py's Config of a preset, its model built by train.build_model + set_trainable on `device`. The
    preset's init points at checkpoints that are not here, so the architecture is built from scratch at the
    real sizes (lm_fn) instead: the same modules, the same trainable set."""
    cfg = load_config(preset_files(preset), overrides)
    cfg.init = InitConfig(source="scratch")
    cfg.model = LlavaConfig(vision=vision or clip_l_336(cfg.model.vision.select_layer), lm=lm_fn(),
                            projector=cfg.model.projector)
    with torch.device(device):
        model = set_trainable(build_model(cfg, cfg.model.lm.vocab_size), cfg.train)
    return cfg, model.train()


def param_counts(model):
    """total (all), LM total and LM active (the paper's convention: embeddings in, experts at top_k / E), trainable."""
    lm, moe = model.lm, model.lm.cfg.moe
    active = 0.0
    for name, p in lm.named_parameters():
        routed = ".mlp.experts." in name or (".mlp.lora_" in name and moe.num_experts > 1)
        active += p.numel() * (moe.top_k / moe.num_experts if routed else 1.0)
    return {"total": sum(p.numel() for p in model.parameters()), "lm": sum(p.numel() for p in lm.parameters()),
            "active": active, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

# -----------------------------------------------------------------------------
# 3. What autograd saves for backward, op by op, under bf16 autocast over fp32 weights (train.py on CUDA)
#
# The rules behind every term (checked by the measurement of section 5):
#   - the residual stream is fp32: the embeddings are fp32, and x + attn(h) adds a bf16 output to it;
#   - F.linear under autocast saves its input in bf16 only if the weight trains (for the weight's gradient),
#     and the bf16 weight always (for the input's). An fp32 input is cast once per consumer: q, k and v each
#     save their own bf16 copy of the norm output. A trainable weight's cast sits in autocast's cache (w_cache),
#     which train.py's exit from autocast before the backward clears, so it lives on where autograd saved it; a
#     frozen weight, or one cast explicitly with .to(), is a new copy saved per call (w_use). Under
#     checkpointing both are recomputed with the block;
#   - RoPE multiplies the bf16 q, k by the fp32 cos/sin, so SDPA receives fp32 q, k and saves bf16 casts;
#   - train.py's batches always carry an attention mask, so SDPA gets a boolean [B, 1, T, T] mask, which it
#     turns into a bf16 additive bias per call and saves (FlashAttention takes no mask: CUDA runs the
#     memory-efficient kernel, which keeps the bias; so does the CPU kernel);
#   - the router runs in fp32 with autocast off and saves its fp32 input; torch._grouped_mm has no autocast
#     rule, so moe.py casts the experts' operands to bf16 itself (explicit copies: w_use).


@dataclass
class Saved:
    act: float = 0.0       # activations: bytes that grow with the micro-batch
    w_cache: float = 0.0   # bf16 casts of trainable weights in autocast's cache (one per weight per forward)
    w_use: float = 0.0     # bf16 weight copies saved per call (frozen weights, explicit casts)
    w_unsaved: float = 0.0  # the part of w_cache no autograd node saves (a layer whose input needs no gradient)

    def __add__(self, o):
        return Saved(self.act + o.act, self.w_cache + o.w_cache, self.w_use + o.w_use, self.w_unsaved + o.w_unsaved)

    @property
    def weights(self):     # what the saved-tensor hooks see
        return self.w_cache - self.w_unsaved + self.w_use


def linear(lin: nn.Linear, rows, input_grad=True):
    """nn.Linear under autocast on `rows` inputs (fp32 inputs are cast, bf16 ones saved as they are: 2 bytes).
    input_grad=False (the projector's first layer: the tower runs without grad): the weight's cast is cached
    but not saved, since no input gradient needs it."""
    w = LOW * lin.weight.numel()
    if lin.weight.requires_grad:
        return Saved(act=rows * lin.in_features * LOW, w_cache=w, w_unsaved=0 if input_grad else w)
    return Saved(w_use=w if input_grad else 0)


def lora_linear(m: LoRALinear, rows, in_bytes, device):
    """moe.LoRALinear: the frozen base, then B(A(dropout(x))). Dropout keeps a bool mask on CUDA (the fused
    kernel) but a noise tensor of x's dtype on CPU; A's input is saved in bf16, B's input is the rank-r code.
    A, B are autocast-cached when x is fp32 (.to(x.dtype) returns the parameter) and copied per call when bf16."""
    i, o, r = m.base.in_features, m.base.out_features, m.lora_A.shape[0]
    weights = LOW * r * (i + o)
    act = rows * (i * (1 if device == "cuda" else in_bytes) + i * LOW + r * LOW)
    return linear(m.base, rows) + Saved(act=act, **{"w_cache" if in_bytes == F32 else "w_use": weights})


def projection(m, rows, in_bytes, device):
    return lora_linear(m, rows, in_bytes, device) if isinstance(m, LoRALinear) else linear(m, rows)


def norm(m, rows, D):
    """LayerNorm: its fp32 input, mean and rstd. RMSNorm (model.py, by hand): x, rstd, and x * rstd when its
    weight trains (the product is what the weight's gradient needs)."""
    if isinstance(m, RMSNorm):
        return Saved(act=rows * (F32 * D + F32 + (F32 * D if m.weight.requires_grad else 0)))
    return Saved(act=rows * (F32 * D + 2 * F32))


def attention(a: Attention, B, T, device):
    S = B * T
    s = sum((projection(p, S, F32, device) for p in (a.q_proj, a.k_proj, a.v_proj)), Saved())
    qk = LOW * (a.H + a.Hkv) * a.hd                      # bf16 casts of the rotated fp32 q, k
    s += Saved(act=S * (qk + LOW * a.Hkv * a.hd + LOW * a.H * a.hd + F32 * a.H))   # + v, out, fp32 logsumexp
    s += Saved(act=B * T * T * LOW)                      # the mask as a bf16 additive bias [B, 1, T, T], per call
    return s + projection(a.o_proj, S, LOW, device)      # o_proj's input: SDPA's output, transposed (a copy)


def dense_mlp(m, S):
    if isinstance(m, SwiGLU):                            # silu's input, the product's two factors, down's input
        return linear(m.gate_proj, S) + linear(m.up_proj, S) + Saved(act=S * LOW * 3 * m.gate_proj.out_features) \
            + linear(m.down_proj, S)
    return linear(m.fc1, S) + Saved(act=S * LOW * m.fc1.out_features) + linear(m.fc2, S)   # gelu's input


def routing(S, E, K):
    """moe.route: softmax probabilities (gather's input), the chosen experts, the kept mask; for k >= 2 the
    renormalisation's numerator and denominator (and clamp_min's input)."""
    return Saved(act=S * (F32 * E + 8 * K + K + (F32 * K + 2 * F32 if K > 1 else 0)))


def moe_layer(m: MoELayer, S):
    """moe.MoELayer, grouped path: router, route, then the M = S*K assignments sorted by expert."""
    E, K, M = m.cfg.num_experts, m.cfg.top_k, S * m.cfg.top_k
    D = m.router.in_features
    lins = [getattr(m.experts, n) for n in FFN_PROJECTIONS[m.kind]]
    F_ = lins[0].weight.shape[1]
    assert all(lin.weight.requires_grad for lin in lins), "the experts train in every stage that has them"
    s = Saved(act=S * F32 * D) + routing(S, E, K)         # the router's fp32 input
    s += Saved(act=M * (8 + LOW * D))                     # gather indices; x_MD, the first grouped mm's input
    if m.kind == "swiglu":                                # silu's input, the product's factors, down's input
        s += Saved(act=M * LOW * 4 * F_)
    else:                                                 # gelu's input, fc2's input; bias repeat_interleave indices
        s += Saved(act=M * (LOW * 2 * F_ + 8 * sum(lin.bias is not None for lin in lins)))
    s += Saved(act=M * (8 + LOW * D))                     # index_copy back to assignment order: index and source
    s += Saved(act=M * (F32 * D + F32))                   # the fp32 [S, K, D] outputs and weights of the weighted sum
    return s + Saved(w_use=LOW * sum(lin.weight.numel() for lin in lins))   # weight.to(bf16) per projection


def lora_experts(m: LoRAExperts, S, device):
    """moe.LoRAExperts (MoLE): frozen dense MLP; per projection every expert's rank-r code [S, E, r] times the
    coefficients c [S, E] (both factors saved when c has a gradient: not for the released top-1 'one'), then one
    matmul with all experts' B as [out, E*r] (its input saved)."""
    E, r = m.cfg.num_experts, m.cfg.lora_rank
    D = m.base.down_proj.out_features if m.kind == "swiglu" else m.base.fc2.out_features
    s = Saved()
    c_grad = m.cfg.mole_mixture == "soft" or m.cfg.mole_top1_gate != "one"
    s += Saved(act=S * F32 * D + S * F32 * E)             # router input, its fp32 softmax
    if c_grad:                                            # the chosen coefficient's gather: its index, and its input
        s += Saved(act=S * 8 + S * F32 * E * (m.cfg.mole_mixture != "soft"))   # unless that is the softmax
    if m.cfg.mole_mixture == "top1" and m.cfg.mole_top1_gate == "prob":
        s += Saved(act=S * F32 * E)                       # the fp32 one-hot of onehot * p
    names = FFN_PROJECTIONS[m.kind]
    for name in names:
        base = getattr(m.base, name)
        i, o = base.in_features, base.out_features
        in_bytes = F32 if name in ("gate_proj", "up_proj", "fc1") else LOW   # the layer input is fp32, down's bf16
        s += linear(base, S)
        s += Saved(act=S * (i * (1 if device == "cuda" else in_bytes)   # dropout mask (CUDA) / noise (CPU)
                            + i * LOW + E * r * LOW * c_grad + E * LOW + E * r * LOW),   # A's input, codes, c, c x codes
                   w_use=LOW * E * r * (i + o))
    F_ = getattr(m.base, names[0]).out_features
    return s + Saved(act=S * LOW * (3 if m.kind == "swiglu" else 1) * F_)   # silu's input + product factors | gelu's


def block(b, B, T, D, device):
    S = B * T
    s = norm(b.attn_norm, S, D) + attention(b.attn, B, T, device)
    if b.mlp_norm is not None:                            # sequential block: the second norm's input is x + attn
        s += norm(b.mlp_norm, S, D)
    if isinstance(b.mlp, MoELayer):
        return s + moe_layer(b.mlp, S)
    if isinstance(b.mlp, LoRAExperts):
        return s + lora_experts(b.mlp, S, device)
    return s + dense_mlp(b.mlp, S)


@dataclass
class Activations:
    blocks: list                 # Saved per decoder block
    outside: Saved               # projector, embeddings, RoPE tables, final norm, loss
    held: float                  # what checkpointing keeps instead of the blocks: their inputs and the 4-D mask
    logits: float                # transient: bf16 and fp32 logits (forward) / their gradients (backward)


def activations(model, B, T, n_text, n_sup, n_images, device="cuda") -> Activations:
    """Saved bytes of one micro-batch: B sequences of T LM positions, n_text text ids, n_sup supervised targets
    and n_images images in all (n_images * P of the positions are image features)."""
    lm, S, D, V = model.lm, B * T, model.lm.cfg.hidden_size, model.lm.cfg.vocab_size
    P = model.cfg.vision.num_features
    blocks = [block(b, B, T, D, device) for b in lm.layers]
    proj = model.projector                                # the frozen tower runs without grad: nothing saved
    out = sum((linear(m, n_images * P, input_grad=i > 0)      # fc1's input (the tower's output) needs no grad
               for i, m in enumerate(proj) if isinstance(m, nn.Linear)), Saved())
    out += Saved(act=n_images * P * LOW * lm.cfg.hidden_size * (len(proj) > 1))   # GELU's input
    out += Saved(act=8 * n_text * lm.embed_tokens.weight.requires_grad)           # embedding indices
    rot = 2 * len(range(0, lm.cfg.rotary_dim, 2))         # model.rope_inv_freq: one frequency per 2 rotated dims
    out += Saved(act=S * F32 * 2 * rot)                  # cos, sin [B, 1, T, rot]: shared by every layer
    out += norm(lm.norm, S, D)                            # the final norm
    out += Saved(act=B * (T - 1)) + linear(lm.lm_head, n_sup)   # the supervised-position mask; lm_head's input
    out += Saved(act=n_sup * (F32 * V + 8))               # cross_entropy: fp32 log-probabilities, targets
    moe = lm.cfg.moe
    if moe is not None and moe.kind == "lora" and moe.mole_balance == "released":   # moe.mole_balance_loss
        L, E = sum(isinstance(b.mlp, LoRAExperts) for b in lm.layers), moe.num_experts
        out += Saved(act=L * S * F32 * E + S * F32 + B * F32 + B * E * F32)   # each layer's softmax, the mask, counts, means
    held = len(lm.layers) * S * F32 * D + B * T * T       # each block's fp32 input, the bool mask (shared)
    # logits in the backward: nll_loss's fp32 gradient and log_softmax's input gradient, both [n_sup, V], while the
    # saved log-probabilities are still alive (the forward's bf16 + fp32 logits are smaller)
    return Activations(blocks, out, held, n_sup * V * 2 * F32)


def saved_bytes(a: Activations, checkpointing):
    """What the saved-tensor hooks see after the forward (section 5 measures exactly this): all blocks, or under
    checkpointing the blocks' held inputs; plus everything outside the blocks."""
    if checkpointing:
        return Saved(act=a.held) + a.outside
    return sum(a.blocks, Saved()) + a.outside


def activation_peak(a: Activations, checkpointing):
    """Estimated peak of activation memory in the step, weight copies apart: everything saved (or held) plus the
    largest transient. Without checkpointing the peak is at the start of the backward: the logits' gradients on
    top of all that is saved, and the first blocks' gradients (WORKSPACE of a block). With it, the logits'
    gradients, or later one block recomputed plus its gradients, whichever is larger. The saved bytes are derived;
    the transients are estimates, checked against the CPU profiler's peak (section 5)."""
    biggest = max(b.act for b in a.blocks)
    if checkpointing:
        return a.held + a.outside.act + max(a.logits, (1 + WORKSPACE) * biggest)
    return sum(b.act for b in a.blocks) + a.outside.act + a.logits + WORKSPACE * biggest


def weight_copies(a: Activations, checkpointing):
    """bf16 weight copies alive at the backward's peak: the saved ones (train.py leaves autocast before the
    backward, which drops the cache's unsaved casts); under checkpointing those outside the blocks plus the one
    block being recomputed, which casts its weights again. (The forward's end is the other candidate peak:
    forward_end; plan_memory takes the larger.)"""
    if checkpointing:
        return a.outside.weights + max(b.w_cache + b.w_use for b in a.blocks)
    return saved_bytes(a, False).weights


def forward_end(a: Activations, checkpointing):
    """The other candidate peak: the forward's last op, log_softmax, with fp32 logits in and out (the output is
    the saved log-probabilities), while autocast's cache still holds every trainable weight's cast."""
    saved = saved_bytes(a, checkpointing)
    cache = sum(b.w_cache for b in a.blocks) + a.outside.w_cache
    return saved.act + a.logits / 2 + cache + (0 if checkpointing else sum(b.w_use for b in a.blocks)) + a.outside.w_use

# -----------------------------------------------------------------------------
# 4. STGC's buffers and the per-GPU plan


def stgc_extra(model, cfg, B, T):
    """Transient bytes of stgc.py's backward hooks, one MoE layer at a time (0 without STGC).
    fast 'bias': u = gate * dL/dy per assignment [M, D] fp32, the gathered expert mean [M, D] fp32, and two
                 [M, D] temporaries (u * pair for the mean; the cosine's products).
    fast 'full': u, and per expert (its tokens, at most the capacity C) the fp32 recompute of the expert: inputs,
                 intermediates and output-gradient probes, plus the mean gradient of each linear map [out, in].
    reference 'full' is not a buffer but a refusal: it would materialise pairs x P_expert fp32 per expert."""
    if not (cfg.stgc.enabled and model.lm.cfg.moe is not None):
        return 0.0
    layer = next(b.mlp for b in model.lm.layers if isinstance(b.mlp, (MoELayer, LoRAExperts)))
    D, K, M = model.lm.cfg.hidden_size, model.lm.cfg.moe.top_k, B * T * model.lm.cfg.moe.top_k
    if cfg.stgc.grad_source == "bias":
        return 4 * F32 * M * D
    F_ = model.lm.cfg.intermediate_size
    C = min(math.ceil(M * cfg.moe.capacity_factor / cfg.moe.num_experts), B * T)   # moe.capacity, per expert
    per_row = F32 * (3 * D + 7 * F_)                      # x, u, d_down; 4 intermediates, 2 probes' grads, 1 temp
    return F32 * M * D + C * per_row + F32 * sum(p.numel() for p in layer.expert_params(0).values())


def reference_full_bytes(model, B, T):
    """stgc impl='reference', grad_source='full': pairs x P_expert x 4 bytes per MoE layer (stgc.per_token_grad_bytes
    per expert; refused at real size with a MemoryError naming stgc.impl='fast')."""
    layer = next(b.mlp for b in model.lm.layers if isinstance(b.mlp, (MoELayer, LoRAExperts)))
    return F32 * B * T * model.lm.cfg.moe.top_k * sum(p.numel() for p in layer.expert_params(0).values())


@dataclass
class Plan:
    name: str
    cfg: object
    preset: str
    T: int                                     # LM positions per sample
    counts: dict
    gb: dict = field(default_factory=dict)     # component -> GiB per GPU
    total: float = 0.0                         # GiB per GPU, the preset's checkpointing setting
    tflop: float = 0.0                         # per sample
    verdict: str = ""
    advice: str = ""
    reference_full: float = 0.0                # bytes, STGC reference 'full' per MoE layer
    fast_full: float = 0.0                     # bytes, STGC fast 'full' transient


def sample_shape(cfg, model, positions=None):
    """The planned micro-batch: B samples of T positions, each one image and T - P + 1 text ids."""
    P = model.cfg.vision.num_features
    T = positions or cfg.data.max_length - 1 + P
    n_text = T - P + 1
    return cfg.train.micro_batch_size, T, n_text, int(SUPERVISED * (n_text - 1))


def plan_memory(cfg, model, positions=None, device="cuda"):
    """Per-GPU bytes by component for train.py's setting in cfg (world = 8)."""
    tc = cfg.train
    B, T, n_text, n_sup = sample_shape(cfg, model, positions)
    a = activations(model, B, T, B * n_text, B * n_sup, B, device)
    params = list(model.parameters())
    n_all, n_train = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    accum = max(1, tc.global_batch_size // (tc.micro_batch_size * WORLD))
    m = {}
    if tc.parallel == "fsdp":
        # FSDP2 keeps 1/8 of everything, computes with bf16 parameters (so autocast makes no copies) and holds:
        # the root's parameters unsharded from forward to backward, two blocks unsharded (current + prefetched),
        # and with accumulation every trainable gradient unsharded in fp32 (FSDP2 to_accumulated_grad_if_needed)
        blocks = [sum(p.numel() for p in b.parameters()) for b in model.lm.layers]
        root = n_all - sum(blocks) - sum(p.numel() for p in model.vision_tower.parameters())
        m["weights"] = F32 * n_all / WORLD
        m["grads"] = F32 * n_train / WORLD
        m["adamw"] = 2 * F32 * n_train / WORLD
        m["bf16 copies"] = LOW * (root + 2 * max(blocks))
        m["fsdp accum"] = F32 * n_train if accum > 1 else 0.0
    else:
        m["weights"] = F32 * n_all
        m["grads"] = F32 * n_train                        # .grad, a view into DDP's buckets (gradient_as_bucket_view)
        m["adamw"] = 2 * F32 * n_train
    for ac in (False, True):
        m[f"act ckpt {'on' if ac else 'off'}"] = activation_peak(a, ac)
        if tc.parallel != "fsdp":
            m[f"copies ckpt {'on' if ac else 'off'}"] = weight_copies(a, ac)
    m["stgc"] = stgc_extra(model, cfg, B, T)
    ac = tc.activation_checkpointing
    static = sum(v for k, v in m.items() if not k.startswith(("act", "copies")))
    peak = m[f"act ckpt {'on' if ac else 'off'}"] + m.get(f"copies ckpt {'on' if ac else 'off'}", 0.0)
    if tc.parallel != "fsdp":                             # (under FSDP2 autocast has no weights to cast)
        peak = max(peak, forward_end(a, ac))
    return {k: v / GiB for k, v in m.items()}, (static + peak) / GiB


def verdict(total_gib):
    if total_gib <= (CARD - RESERVE) / GiB:
        return "fits"
    return "tight" if total_gib <= CARD / GiB else "does not fit"


def advise(cfg, model, positions=None):
    """The first single change that makes a preset fit: activation checkpointing, then FSDP, then a smaller
    micro-batch (the global batch is kept through gradient accumulation)."""
    tc = cfg.train
    tries = []
    if not tc.activation_checkpointing:
        tries.append(("train.activation_checkpointing=true", replace(tc, activation_checkpointing=True)))
    if tc.parallel == "ddp":
        tries.append(('train.parallel="fsdp"', replace(tc, parallel="fsdp")))
    b = tc.micro_batch_size // 2
    while b >= 1:
        tries.append((f"train.micro_batch_size={b}", replace(tc, micro_batch_size=b)))
        b //= 2
    for text, tc2 in tries:
        _, total = plan_memory(replace(cfg, train=tc2), model, positions)
        if verdict(total) == "fits":
            return f"set {text} ({total:.1f} GiB)"
    return "no single setting fits: combine activation checkpointing, FSDP and micro-batch 1"


def plan(name, preset, lm_fn, overrides=(), positions=None) -> Plan:
    cfg, model = build(preset, lm_fn, overrides)
    B, T, _, _ = sample_shape(cfg, model, positions)
    p = Plan(name, cfg, preset, T, param_counts(model))
    p.gb, p.total = plan_memory(cfg, model, positions)
    p.tflop = flops_per_step(model, T, 1) / 1e12
    p.verdict = verdict(p.total)
    p.advice = "" if p.verdict == "fits" else advise(cfg, model, positions)
    if cfg.train.stage == "moe":
        p.reference_full = reference_full_bytes(model, B, T)
        p.fast_full = stgc_extra(model, replace(cfg, stgc=replace(cfg.stgc, enabled=True, grad_source="full")), B, T)
    return p

# -----------------------------------------------------------------------------
# 5. The check: the activation model against what autograd really saves, at a tiny size of the same structure


def tiny(lm: LMConfig) -> LMConfig:
    """The same family, norm, MLP, biases and rotary fraction at widths a CPU runs in milliseconds."""
    return replace(lm, vocab_size=300, hidden_size=96, intermediate_size=272, num_layers=4, num_heads=4,
                   num_kv_heads=0, head_dim=0, moe=None, max_position_embeddings=1024)


def tiny_vision():
    """56 px / patch 14: 16 patch features per image; the tower runs without grad, as at real size."""
    return VisionConfig(image_size=56, patch_size=14, hidden_size=48, intermediate_size=112, num_layers=3, num_heads=2)


def tiny_batch(B, n_text, vocab, seed=0):
    """B samples of one image + n_text ids (the <image> id second); the last 75% of the text is supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, n_text), generator=g)              # [B, n_text]
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :n_text - int(SUPERVISED * (n_text - 1))] = IGNORE_INDEX   # [B, n_text]
    return ids, labels, torch.randn(B, 3, 56, 56, generator=g)


def measure_saved(model, ids, labels, images, checkpointing):
    """Bytes of the distinct storages autograd saves in one training forward (bf16 autocast on CPU), parameters
    excluded; under checkpointing also what torch.utils.checkpoint holds for its recompute (each block's tensor
    arguments), which it keeps outside the saved-tensor hooks."""
    storages, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()       # views share their storage: counted once

    def keep_args(module, args):                      # returns None: the arguments pass unchanged
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)

    hooks = [layer.register_forward_pre_hook(keep_args) for layer in model.lm.layers] if checkpointing else []
    model.lm.activation_checkpointing = checkpointing
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (keep(t), t)[1], lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, images, labels=labels)
        n_sup = int(out.num_tokens)
        del out
    finally:
        for h in hooks:
            h.remove()
        model.lm.activation_checkpointing = False
    return sum(storages.values()), n_sup


def check_preset(preset, lm_fn, B=2, n_text=49, bf16_params=False):
    """Measured vs modelled saved bytes at the tiny size: activations from two batch sizes (B and 2B: activations
    double, weight copies do not), for checkpointing off and on: {ckpt: {"act" | "weights": (measured, modelled)}}.
    bf16_params: the parameters in bf16 (routers fp32), as FSDP2's mixed precision computes; the model stays the
    fp32-master one, so this says how far it overestimates an FSDP run."""
    torch.manual_seed(0)
    cfg, model = build(preset, lambda: tiny(lm_fn()), device="cpu", vision=tiny_vision())
    if bf16_params:
        routers_to_fp32(model.to(torch.bfloat16))
    V, P = model.lm.cfg.vocab_size, model.cfg.vision.num_features
    T = n_text - 1 + P
    out = {}
    for ac in (False, True):
        m, n = zip(*(measure_saved(model, *tiny_batch(b, n_text, V), ac) for b in (B, 2 * B)))
        a = activations(model, B, T, B * n_text, n[0], B, device="cpu")
        model_saved = saved_bytes(a, ac)
        out[ac] = {"act": (m[1] - m[0], model_saved.act), "weights": (2 * m[0] - m[1], model_saved.weights)}
    return out


def measure_peak(preset, lm_fn, B=4, n_text=497):
    """The CPU allocator's peak over one forward + backward at a small size (torch.profiler memory events) above
    what was allocated before it, next to the model's peak (activations + weight copies) for the same step. A first
    forward + backward allocates the parameter gradients, so the measured step accumulates into them as the
    presets' second micro-batch does. At this shape (4 x 512 positions) activations dominate."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    cfg, model = build(preset, lambda: tiny(lm_fn()), device="cpu", vision=tiny_vision())
    V, P = model.lm.cfg.vocab_size, model.cfg.vision.num_features
    ids, labels, images = tiny_batch(B, n_text, V)
    out = {}
    for ac in (False, True):
        model.lm.activation_checkpointing = ac
        def step():                                       # as train.train_step: the backward outside autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                r = model(ids, images, labels=labels)
            r.loss.backward()
            return int(r.num_tokens)

        step()                                            # allocates the gradients
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            n_sup = step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        a = activations(model, B, n_text - 1 + P, B * n_text, n_sup, B, device="cpu")
        out[ac] = (peak, max(activation_peak(a, ac) + weight_copies(a, ac), forward_end(a, ac)))   # as plan_memory
    model.lm.activation_checkpointing = False
    return out

# -----------------------------------------------------------------------------
# 6. The table


def gib(x):
    return f"{x:.1f}"


def table(plans):
    rows = ["| preset (stage) | micro-batch x positions, parallel, act. ckpt | params total / LM / LM active (paper) | "
            "trainable | weights | grads | AdamW | bf16 copies | activations ckpt off / on | STGC | total GiB | "
            "80 GB? | TFLOP / sample |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        c, g, tc = p.counts, p.gb, p.cfg.train
        paper = PAPER.get(os.path.basename(p.preset))
        paper = f" ({paper[0] / 1e9:.1f}B / {paper[1] / 1e9:.1f}B)" if paper else ""
        ac = "on" if tc.activation_checkpointing else "off"
        copies = g.get(f"copies ckpt {ac}", g.get("bf16 copies", 0.0))
        grads = g["grads"] + g.get("fsdp accum", 0.0)
        fits = f"**{p.verdict}**" + (f": {p.advice}" if p.advice else "")
        rows.append(f"| {p.name} | {tc.micro_batch_size} x {p.T}, {tc.parallel}, {ac} | {c['total'] / 1e9:.2f}B / "
                    f"{c['lm'] / 1e9:.2f}B / {c['active'] / 1e9:.2f}B{paper} | {c['trainable'] / 1e9:.3f}B | "
                    f"{gib(g['weights'])} | {gib(grads)}{'*' if g.get('fsdp accum') else ''} | {gib(g['adamw'])} | "
                    f"{gib(copies)} | {gib(g['act ckpt off'])} / {gib(g['act ckpt on'])} | {gib(g['stgc'])} | "
                    f"**{gib(p.total)}** | {fits} | {p.tflop:.1f} |")
    return rows


def check_lines():
    """Section 5 as RESULTS.md lines: saved bytes per preset structure (the + STGC presets run the same forward),
    the FSDP2-like bf16-parameter variant of the FSDP presets, and two peaks."""
    lines = ["| preset structure (tiny) | act. ckpt | activations measured / modelled KiB | ratio | "
             "weight copies measured / modelled KiB | ratio |", "|---|---|---|---|---|---|"]
    worst = 0.0
    runs = [(name, preset, fn, False) for name, preset, fn in PRESETS if "STGC" not in name]
    runs += [(name + ", bf16 parameters (FSDP2)", preset, fn, True) for name, preset, fn in PRESETS
             if "STGC" not in name and load_config(preset_files(preset)).train.parallel == "fsdp"]
    for name, preset, fn, bf16 in runs:
        for ac, r in check_preset(preset, fn, bf16_params=bf16).items():
            (ma, pa), (mw, pw) = r["act"], r["weights"]
            if not bf16:
                worst = max(worst, abs(ma / pa - 1), abs(mw / pw - 1))
            weights = "n/a (the bf16 parameters are used as they are) | n/a" if bf16 else \
                f"{mw / 1024:,.1f} / {pw / 1024:,.1f} | {mw / pw:.3f}"
            lines.append(f"| {name} | {'on' if ac else 'off'} | {ma / 1024:,.1f} / {pa / 1024:,.1f} | "
                         f"{ma / pa:.3f} | {weights} |")
    lines += ["", "Largest disagreement of the saved-bytes model (fp32 master weights, as train.py under DDP): "
              f"{worst:.2%}.", "", "Peak check: forward + backward at B=4 x 512 positions (16 image + 496 text) on "
              "CPU, the torch.profiler allocation peak above the memory held before (gradients already allocated, as "
              "in the presets' second micro-batch) vs the modelled activation peak + weight copies. WORKSPACE (the "
              f"backward allowance) was set to {WORKSPACE} from this measurement, so it is a consistency check of the transients, not an "
              "independent one:", ""]
    for i in (0, 9):
        name, preset, fn = PRESETS[i]
        peaks = measure_peak(preset, fn)
        lines.append(f"- {name} structure: " + "; ".join(
            f"checkpointing {'on' if ac else 'off'} {m / 2 ** 20:.1f} MiB measured / {p / 2 ** 20:.1f} MiB modelled "
            f"= {m / p:.2f}" for ac, (m, p) in peaks.items()))
    return lines


LLMS = {"stablelm": stablelm_2_1_6b, "qwen": qwen_1_8b, "phi2": phi_2, "llava15": vicuna_7b}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other --section.key=value arguments "
                                 "override the preset(s), as in train.py.")
    ap.add_argument("--preset", help="one preset file (default: the paper presets); its LLM is told by its name "
                    f"({', '.join(LLMS)})")
    ap.add_argument("--positions", type=int, default=None,
                    help="LM positions per sample (default data.max_length - 1 + 576)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone (also "
                    "implied by --preset, --positions and overrides: what-ifs never replace the presets' block)")
    ap.add_argument("--no-check", action="store_true", help="skip the measurement at tiny size (section 5)")
    args, overrides = ap.parse_known_args(argv)
    set_cpu_threads()
    presets = PRESETS
    if args.preset:
        lm_fn = next((f for key, f in LLMS.items() if key in os.path.basename(args.preset)), None)
        if lm_fn is None:
            ap.error(f"cannot tell the LLM of {args.preset}: its name holds none of {', '.join(LLMS)}")
        presets = [(os.path.basename(args.preset), args.preset, lm_fn)]
    plans = [plan(name, preset, lm_fn, overrides, args.positions) for name, preset, lm_fn in presets]
    lines = [header(", meta device (nothing allocated), no GPU"), "",
             f"Per GPU of {WORLD}, GiB. Each sample: one image + text cut at data.max_length ids = the positions shown "
             f"(576 of them image features), {SUPERVISED:.0%} of its text supervised; every sample that long. Budget: an "
             f"80 GB card = {CARD / GiB:.1f} GiB; *fits* leaves {RESERVE / GiB:.0f} GiB of it for the CUDA context, NCCL "
             "and fragmentation, *tight* is within it. grads = .grad, a view into DDP's buckets (DDP), or the 1/8 shard "
             "(FSDP; * adds FSDP2's unsharded fp32 accumulator, since the presets accumulate 2 micro-batches). bf16 "
             "copies = autocast's weight casts (DDP) or FSDP2's unsharded bf16 root + 2 blocks. Activations = the "
             "modelled backward peak (saved tensors + the logits' or one block's backward transient); for FSDP rows an "
             "upper bound (see the check). total = the preset's own setting: the static memory + the larger of that "
             "backward peak (activations + copies) and the forward's end (every cached cast + the fp32 logits).", ""]
    lines += table(plans)
    refs = {p.name.split(" (")[0]: p for p in plans if p.reference_full}
    if refs:
        tib = "; ".join(f"{k} {p.reference_full / 2 ** 40:,.1f} TiB" for k, p in refs.items())
        lines += ["", "STGC with grad_source='full' (the presets use 'bias'): impl='reference' would materialise pairs x "
                  f"P_expert fp32 per MoE layer, {tib} (stgc.py refuses it with a MemoryError naming stgc.impl='fast'); "
                  "impl='fast' needs instead, one layer at a time, "
                  + "; ".join(f"{p.fast_full / GiB:.1f} GiB" for p in refs.values()) + "."]
    print("\n".join(lines))
    if not args.no_check:
        check = check_lines()
        print("\n".join(check))
        lines += ["", "Check of the activation model at a tiny size of each preset's structure (D=96, F=272, 4 layers, "
                  "vocab 300, 16 image features + 48 text ids = 64 positions): one training forward on CPU under bf16 "
                  "autocast; measured = the distinct storages torch.autograd.graph.saved_tensors_hooks sees (+ the block "
                  "inputs checkpointing holds); activations = B=4 minus B=2, weight copies = what does not grow.", ""]
        lines += check
    if not (args.no_write or args.preset or args.positions or overrides):
        update_results("memory_plan", "Real-size memory plan (`bench/memory_plan.py`)", "\n".join(lines))
    return plans


if __name__ == "__main__":
    main()
