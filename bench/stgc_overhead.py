"""STGC overhead: one training step (forward, backward, AdamW step) of plain MoE vs MoE + STGC fast vs
MoE + STGC reference, for the 'bias' and 'full' gradient sources, measured side by side in one run
(interleaved repeats, median), printed as ratios to plain MoE. Peak memory on CUDA.

    .venv/bin/python bench/stgc_overhead.py            # tiny CPU shape; with CUDA also a StableLM-1.6B-4e shape

Writes its table into bench/RESULTS.md (the `stgc_overhead` block); the reference 'full' variant makes a CPU
run take a few minutes.
"""
import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, time_interleaved, update_results
from model import LanguageModel, LMConfig
from moe import MoEConfig
from stgc import STGC, STGCConfig

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


if __name__ == "__main__":
    set_cpu_threads()
    lines = [header(), "", "| shape | variant | step ms | vs plain MoE | peak memory |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    tiny = LMConfig(family="stablelm", vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4,
                    num_heads=4, norm="layernorm", norm_eps=1e-5, qkv_bias=True, partial_rotary_factor=0.25)
    lines += bench("tiny: D=256, F=704, 4 layers (2 MoE), E=4 k=2, B=4 T=256, fp32", tiny, 4, 256, "cpu", torch.float32, 5,
                   ["plain", "fast bias", "fast full", "reference bias", "reference full"])
    if torch.cuda.is_available():
        # StableLM-2-1.6B widths, 4 of its 24 layers (2 MoE) to fit the reference path's per-token gradients
        big = LMConfig(family="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_layers=4,
                       num_heads=32, norm="layernorm", norm_eps=1e-5, qkv_bias=True, partial_rotary_factor=0.25)
        lines += bench("StableLM-1.6B-4e widths, 4 layers, B=4 T=2048, bf16 autocast", big, 4, 2048, "cuda", torch.bfloat16,
                       10, ["plain", "fast bias", "fast full"])
    else:
        lines += ["", "**Missing: GPU figures** (the StableLM-1.6B-4e widths, 4 layers, bf16, with peak memory): no GPU "
                  "was lent to this session; the script adds that row when CUDA is available."]
    update_results("stgc_overhead", "STGC overhead (`bench/stgc_overhead.py`)", "\n".join(lines))
