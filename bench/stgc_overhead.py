"""STGC overhead: one training step (forward, backward, AdamW step) of plain MoE vs MoE + STGC fast vs
MoE + STGC reference, for the 'bias' and 'full' gradient sources, measured side by side in one run
(interleaved repeats, median), printed as ratios to plain MoE. Two tables:

  tiny         a 4-layer LanguageModel step written here (CPU, fp32), every variant including the reference
  stage III    train.py's own `train_step` on the MoE-LLaVA-StableLM-1.6B-4e model of the preset
               configs/moe_llava_stablelm.toml + configs/stgc.toml (its [train], [moe], [stgc]: micro-batch 8, activation
               checkpointing, bf16 autocast, fused AdamW), random weights, 2048 positions per sample of which
               576 are image features; STGC off / fast bias / fast full, with MFU and peak memory (CUDA only)

    .venv/bin/python bench/stgc_overhead.py            # tiny CPU shape; with CUDA also the stage-III step

Writes its tables into bench/RESULTS.md (the `stgc_overhead` block); the reference 'full' variant makes a CPU
run take a few minutes.
"""
import os
import time
from dataclasses import replace

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, synchronize, time_interleaved, update_results
from model import LanguageModel, LMConfig, VisionConfig
from moe import MoEConfig
from stgc import STGC, STGCConfig
from train import flops_per_step, load_config, peak_flops, train_step
from train_throughput import IMAGE_TOKENS, SEQ, make_batch, make_ctx, stablelm_1_6b, train_py_flags

ALPHA = 0.01


def step(lm, opt, batch, stgc):
    out = lm(**batch) if stgc is None or stgc.cfg.impl == "fast" else None
    if stgc is None:
        loss = out.loss + ALPHA * out.aux_loss
    elif stgc.cfg.impl == "fast":
        stgc.attach(out.routing)
        loss = out.loss + ALPHA * out.aux_loss
    else:
        conflicts = stgc.reference_conflicts(lambda: lm(**batch))
        out = lm(**batch)
        loss = out.loss + ALPHA * out.aux_loss + stgc.cel(out.routing, conflicts)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench(name, lm_cfg, B, T, device, dtype, repeats, variants):
    torch.manual_seed(0)
    lm = LanguageModel(lm_cfg).install_moe(MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5)).to(device).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    ids = torch.randint(0, lm_cfg.vocab_size, (B, T), device=device)
    batch = dict(input_ids=ids, labels=ids)
    cuda = device == "cuda"
    peaks = {}

    def run(v):
        stgc = None if v == "plain" else STGC(STGCConfig(enabled=True, impl=v.split()[0], grad_source=v.split()[1]))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            step(lm, opt, batch, stgc)
        if cuda:
            peaks[v] = torch.cuda.max_memory_allocated() / 2**30   # allocator statistics: no sync needed

    times = time_interleaved({v: lambda v=v: run(v) for v in variants}, repeats, device)   # round 0 warms up
    rows = []
    for v in variants:
        t = times[v]
        mem = f"{peaks[v]:.2f} GiB ({peaks[v] / peaks['plain']:.3f}x)" if cuda else "n/a (CPU)"
        rows.append(f"| {name} | {v} | {t * 1e3:.1f} | {t / times['plain']:.2f}x | {mem} |")
        print(rows[-1])
    return rows


# -----------------------------------------------------------------------------
# Stage III at the preset: train.py's train_step with STGC off / fast bias / fast full

PRESET = [os.path.join(common.ROOT, "configs", f) for f in ("moe_llava_stablelm.toml", "stgc.toml")]   # --config x2
VARIANTS = {"off": None, "fast bias": "bias", "fast full": "full"}   # name -> grad_source
STAGE3_TABLE = ["| model (preset) | STGC | micro-batch x seq, act. ckpt | step ms | vs STGC off | tokens/s | MFU | "
                "peak memory | conflict ratio |", "|---|---|---|---|---|---|---|---|---|"]


def stage3_rows(name, lm_cfg, vision_cfg, device, repeats, warmup=1, micro_batch=None, moe_impl=None, deadline=None,
                emit=print):
    """Rows of STAGE3_TABLE. The preset's micro-batch (8) is halved until every variant's step fits in memory,
    and the row says so. MFU counts the model's FLOPs (train.flops_per_step), not STGC's extra work nor the
    recomputation of activation checkpointing, so it falls as STGC costs more. moe_impl overrides the preset's
    moe.impl ('fast': moe.dispatch_path's choice). deadline (a time.time()): fewer rounds than `repeats` if the
    memory probe's step times say they would not end by then (the row says so)."""
    device = torch.device(device)
    train_py_flags(device)
    cfg = load_config(PRESET, [f"--moe.impl={moe_impl}"] if moe_impl else [])
    ctx = make_ctx(cfg.train.stage, lm_cfg, vision_cfg, device, base=cfg)
    ctx.raw.lm.activation_checkpointing = cfg.train.activation_checkpointing
    assert ctx.raw.cfg.vision.num_features == IMAGE_TOKENS
    stgcs = {v: None if src is None else STGC(replace(cfg.stgc, enabled=True, impl="fast", grad_source=src))
             for v, src in VARIANTS.items()}
    cuda = device.type == "cuda"
    peaks, conflicts, batch = {}, {}, None

    def run(v):
        ctx.stgc = stgcs[v]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        log = train_step(ctx, [batch], step=10, total_steps=100)     # past the warmup; the lr value costs nothing
        assert "skipped_nonfinite" not in log, log
        if cuda:
            peaks[v] = max(peaks.get(v, 0), torch.cuda.max_memory_allocated() / 2**30)
        if log.get("stgc"):
            conflicts[v] = sum(s["conflict_ratio"] for s in log["stgc"]) / len(log["stgc"])

    B, note = micro_batch or cfg.train.micro_batch_size, "" if not moe_impl else f", moe.impl={moe_impl}"
    while True:                                    # one step of each variant at B: the memory probe
        batch = make_batch(B, lm_cfg.vocab_size, vision_cfg.image_size, device)
        try:
            t0 = time.perf_counter()
            for v in VARIANTS:
                run(v)
            synchronize(device)
            probe_s = time.perf_counter() - t0     # one round, first-step costs included: an overestimate
            break
        except torch.cuda.OutOfMemoryError:
            if B == 1:
                raise
        # outside the except block, so the traceback no longer pins the failed step's activations
        batch = None
        peaks.clear()
        ctx.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        note += f" (micro-batch {B} ran out of memory: halved)"
        B //= 2
    if deadline is not None:
        fit = int((deadline - time.time()) / probe_s)
        warmup = min(warmup, max(0, fit - 1))
        if fit - warmup < repeats:
            repeats = max(1, fit - warmup)
            note += f" (median of {repeats}: the time cap)"
    t = time_interleaved({v: lambda v=v: run(v) for v in VARIANTS}, repeats, device, warmup=warmup)
    flops, peak = flops_per_step(ctx.raw, B * SEQ, B), peak_flops(device)
    rows = []
    ckpt = "on" if cfg.train.activation_checkpointing else "off"
    for v in VARIANTS:
        mfu = f"**{flops / t[v] / peak:.1%}**" if peak else ("n/a (unknown GPU peak)" if cuda else "n/a (CPU)")
        mem = f"{peaks[v]:.1f} GiB" if cuda else "n/a (CPU)"
        conflict = f"{conflicts[v]:.1%}" if v in conflicts else "-"
        rows.append(f"| {name} | {v} | {B} x {SEQ} ({IMAGE_TOKENS} image), {ckpt}{note} | {t[v] * 1e3:.0f} | "
                    f"{t[v] / t['off']:.2f}x | {B * SEQ / t[v]:,.0f} | {mfu} | {mem} | {conflict} |")
        emit(rows[-1])
    return rows


if __name__ == "__main__":
    set_cpu_threads()
    lines = [header(), "", "| shape | variant | step ms | vs plain MoE | peak memory |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    tiny = LMConfig(family="stablelm", vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4,
                    num_heads=4, norm="layernorm", norm_eps=1e-5, qkv_bias=True, partial_rotary_factor=0.25)
    lines += bench("tiny: D=256, F=704, 4 layers (2 MoE), E=4 k=2, B=4 T=256, fp32", tiny, 4, 256, "cpu", torch.float32, 5,
                   ["plain", "fast bias", "fast full", "reference bias", "reference full"])
    if torch.cuda.is_available():
        lines += ["", "Stage III, train.py's `train_step` at the preset (bf16 autocast, fp32 master weights, fused AdamW):", ""]
        lines += STAGE3_TABLE + stage3_rows("MoE-LLaVA-StableLM-1.6B-4e + CLIP-L/14-336", stablelm_1_6b(), VisionConfig(),
                                            "cuda", repeats=5)
    else:
        lines += ["", "**Missing: GPU figures** (stage III at the StableLM-1.6B-4e preset, bf16, with MFU and peak memory): "
                  "no GPU was lent to this session; the script adds that table when CUDA is available."]
    update_results("stgc_overhead", "STGC overhead (`bench/stgc_overhead.py`)", "\n".join(lines))
