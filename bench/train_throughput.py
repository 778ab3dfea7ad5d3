"""Training throughput: tokens/s and MFU of train.py's own optimizer step (`train.train_step`: bf16 autocast on
CUDA with fp32 master weights, loss, backward, grad clipping, AdamW) for

  MoE-LLaVA-StableLM-1.6B-4e  stage III (moe): 12 of 24 layers with 4 upcycled experts, top-2; every FFN, the
                              routers and the projector train; CLIP ViT-L/14-336 tower frozen
  StableLM-1.6B dense         stage II (finetune): the whole LLM and the projector train

with activation checkpointing off and on (the two interleaved, median), one sequence = 2048 LM positions of
which 576 are one image's patch features (the image placeholder + 1471 text tokens).

FLOPs per step are train.py's `flops_per_step` (not duplicated here):
    6 * N_active * tokens  +  12 * L * D * 2048 * tokens  +  2 * N_tower * 577 * images
N_active = LM parameters without the embedding, experts counted at top_k / E = 2/4, lm_head included;
the second term is attention scores (QK^T and AV, forward + backward, sequence ~2048); the third the frozen
tower's forward over its 577 positions. Recomputation under activation checkpointing is not counted (MFU
counts the model's FLOPs, not the hardware's). MFU = FLOPs per step / step time / peak bf16 FLOP/s
(train.py's table: H100 989e12 dense).

The real shape needs CUDA; on CPU a tiny proportional shape (same sequence layout: 2048 positions, 576 of
them image features, 4 layers, D=128) runs in fp32 so the script and the formula are exercised; there is no
CPU peak, so no MFU, only the achieved FLOP/s.

    .venv/bin/python bench/train_throughput.py

Writes its table into bench/RESULTS.md (the `train_throughput` block).
"""
import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, time_interleaved, update_results
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaConfig, LMConfig, VisionConfig
from moe import MoEConfig
from train import (PEAK_BF16_FLOPS, Config, Context, InitConfig, TrainConfig, build_model, flops_per_step, param_groups,
                   peak_flops, set_trainable, train_step)

SEQ, IMAGE_TOKENS = 2048, 576


def stablelm_1_6b():
    return LMConfig(family="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_layers=24,
                    num_heads=32, norm="layernorm", norm_eps=1e-5, qkv_bias=True, partial_rotary_factor=0.25)


def tiny_lm():
    return LMConfig(family="stablelm", vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4,
                    num_heads=2, norm="layernorm", norm_eps=1e-5, qkv_bias=True, partial_rotary_factor=0.25)


def tiny_vision():
    """336 px / patch 14 like CLIP-L/14-336, so one image still gives 576 patch features; tiny widths."""
    return VisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2)


def make_ctx(stage, lm_cfg, vision_cfg, device, base: Config = None):
    """train.py's Context for `stage` on a model of these sizes with random weights. base: a loaded preset whose
    [train], [moe] and [stgc] sections to keep (bench/stgc_overhead.py passes configs/moe_llava_stablelm.toml + stgc.toml)."""
    cfg = base or Config(train=TrainConfig(stage=stage, dtype="bf16"),
                         moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5, layers="sparse"))
    cfg.train.stage, cfg.init, cfg.model = stage, InitConfig(), LlavaConfig(vision=vision_cfg, lm=lm_cfg)   # scratch
    torch.manual_seed(0)
    with torch.device(device):
        model = set_trainable(build_model(cfg, lm_cfg.vocab_size), cfg.train).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train), lr=cfg.train.lr, fused=device.type == "cuda")
    return Context(cfg, model, model, optimizer, sampler=None, rank=0, world=1, device=device, extra_config={})


def train_py_flags(device):
    """The process-wide settings train.main makes before training: TF32 for the matmuls that run outside autocast
    (fp32 ones, e.g. STGC's 'full' cosines). Called by the benches, not by make_ctx (tests share the process)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def make_batch(B, vocab, image_size, device):
    """B samples of one image + text: 1 + 1 placeholder + (SEQ - IMAGE_TOKENS - 1) ids = SEQ LM positions.
    Every text position is supervised (the lm_head runs where labels are set; real answers cover fewer)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, SEQ - IMAGE_TOKENS + 1), generator=g)   # [B, 1473]
    ids[:, 1] = IMAGE_TOKEN_INDEX                                              # spliced into 576 positions
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)           # [B, 1473]
    images = torch.randn(B, 3, image_size, image_size, generator=g)            # [B, 3, 336, 336]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "images": images.to(device)}


def step(ctx, batch, checkpointing):
    ctx.raw.lm.activation_checkpointing = checkpointing
    log = train_step(ctx, [batch], step=10, total_steps=100)   # past the warmup; the lr value costs nothing
    assert "skipped_nonfinite" not in log, log


def largest_batch(ctx, B, checkpointing):
    """B, halved until one step fits in GPU memory (activation checkpointing off needs far more)."""
    while True:
        batch = make_batch(B, ctx.raw.lm.cfg.vocab_size, ctx.raw.cfg.vision.image_size, ctx.device)
        try:
            step(ctx, batch, checkpointing)
            return B, batch
        except torch.cuda.OutOfMemoryError:
            if B == 1:
                raise
        # outside the except block, so the traceback no longer pins the failed step's activations
        del batch
        ctx.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        B //= 2


def real_size_accounting():
    """The real models' FLOP accounting, built on the meta device (no memory, no GPU): what an H100 must
    sustain for 40% MFU. Computed, not measured."""
    rows = []
    for name, stage in (("MoE-LLaVA-StableLM-1.6B-4e + CLIP-L/14-336", "moe"), ("StableLM-1.6B + CLIP-L/14-336", "finetune")):
        cfg = Config(train=TrainConfig(stage=stage), model=LlavaConfig(vision=VisionConfig(), lm=stablelm_1_6b()),
                     moe=MoEConfig(num_experts=4, top_k=2, layers="sparse"))
        with torch.device("meta"):
            model = build_model(cfg, cfg.model.lm.vocab_size)
        attn = 12 * cfg.model.lm.num_layers * cfg.model.lm.hidden_size * 2048
        n_active = (flops_per_step(model, 1, 0) - attn) / 6
        n_tower = flops_per_step(model, 0, 1) / (2 * cfg.model.vision.num_positions)
        sample = flops_per_step(model, SEQ, 1)                         # one 2048-position sample with one image
        need = 0.4 * PEAK_BF16_FLOPS["H100"] / sample * SEQ
        rows.append(f"| {name} ({stage}) | {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B | "
                    f"{n_active / 1e9:.3f}B | {n_tower / 1e6:.0f}M | {sample / 1e12:.1f} | {need:,.0f} |")
    return rows


def bench(name, stage, lm_cfg, vision_cfg, B, device, repeats):
    train_py_flags(device)
    ctx = make_ctx(stage, lm_cfg, vision_cfg, device)
    raw = ctx.raw
    assert raw.cfg.vision.num_features == IMAGE_TOKENS
    batches = {ac: largest_batch(ctx, B, ac) for ac in (False, True)}
    t = time_interleaved({ac: lambda ac=ac: step(ctx, batches[ac][1], ac) for ac in batches}, repeats, device)
    # N_active and N_tower as flops_per_step counts them (attention term removed), for the table
    attn = 12 * lm_cfg.num_layers * lm_cfg.hidden_size * 2048
    n_active = (flops_per_step(raw, 1, 0) - attn) / 6
    n_tower = flops_per_step(raw, 0, 1) / (2 * raw.cfg.vision.num_positions)
    peak = peak_flops(device)
    rows = []
    for ac, (b, _) in batches.items():
        flops = flops_per_step(raw, b * SEQ, b)
        achieved = flops / t[ac]
        mfu = f"**{achieved / peak:.1%}**" if peak else "n/a (CPU)"
        rows.append(f"| {name} | {'on' if ac else 'off'} | {b} x {SEQ} ({IMAGE_TOKENS} image) | {t[ac] * 1e3:.0f} | "
                    f"{b * SEQ / t[ac]:,.0f} | {n_active / 1e6:,.1f}M + {n_tower / 1e6:,.1f}M | "
                    f"{flops / 1e12:.3f} | {achieved / 1e12:.3f} | {mfu} | {t[ac] / t[False] * batches[False][0] / b:.2f}x |")
    del ctx, raw, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    set_cpu_threads()
    lines = [header(), "",
             "| model (stage) | act. ckpt | batch x seq | step ms | tokens/s | N_active LM + tower | model TFLOP/step | "
             "achieved TFLOP/s | MFU | time/token vs ckpt off |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    cpu = torch.device("cpu")
    for name, stage in (("tiny MoE 4e top-2 (moe), fp32", "moe"), ("tiny dense (finetune), fp32", "finetune")):
        lines += bench(name, stage, tiny_lm(), tiny_vision(), 1, cpu, repeats=5)
        print("\n".join(lines[-2:]))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        for name, stage in (("MoE-LLaVA-StableLM-1.6B-4e + CLIP-L/14-336 (moe), bf16", "moe"),
                            ("StableLM-1.6B dense + CLIP-L/14-336 (finetune), bf16", "finetune")):
            lines += bench(name, stage, stablelm_1_6b(), VisionConfig(), 8, gpu, repeats=5)
            print("\n".join(lines[-2:]))
    else:
        lines += ["", "**Missing: MoE-LLaVA-StableLM-1.6B-4e and StableLM-1.6B at real size (bf16, micro-batch 8 x 2048 halved "
                  "until it fits, activation checkpointing on and off) on GPU, and their MFU**: no GPU was lent to this session; the "
                  "script runs them automatically when CUDA is available."]
    lines += ["", "Real-size FLOP accounting (`flops_per_step` on models built on the meta device; computed, not measured):", "",
              "| model (stage) | parameters | N_active LM | N_tower | model TFLOP per 2048-position sample | tokens/s one H100 needs for 40% MFU |",
              "|---|---|---|---|---|---|"] + real_size_accounting()
    print("\n".join(lines[-4:]))
    update_results("train_throughput", "Training throughput and MFU (`bench/train_throughput.py`)", "\n".join(lines))
