"""MoE dispatch: time of one MoE forward + backward, grouped fast path vs the per-expert loop,
measured side by side in one run (interleaved repeats, median).

    .venv/bin/python bench/moe_dispatch.py                 # CPU tiny shape; on CUDA also the StableLM-1.6B-4e FFN
"""
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import LMConfig, SwiGLU  # noqa: E402
from moe import MoEConfig, MoELayer  # noqa: E402


def time_step(layer, x, sync):
    t0 = time.perf_counter()
    y, rec = layer(x)
    (y.float().pow(2).mean() + rec.aux_loss).backward()
    sync()
    return time.perf_counter() - t0


def bench(name, D, F, B, T, dtype, device, repeats):
    cfg = LMConfig(hidden_size=D, intermediate_size=F, num_heads=8, num_layers=1, vocab_size=8)
    dense = SwiGLU(cfg).to(device=device, dtype=dtype)
    layers = {impl: MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5, impl=impl), dense).to(device).train()
              for impl in ("fast", "loop")}
    layers["loop"].load_state_dict(layers["fast"].state_dict())
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {impl: [] for impl in layers}
    for i in range(repeats + 2):                                      # 2 warm-up rounds, interleaved
        for impl, layer in layers.items():
            t = time_step(layer, x, sync)
            if i >= 2:
                times[impl].append(t)
    fast, loop = statistics.median(times["fast"]), statistics.median(times["loop"])
    return (f"| {name} | {device} {dtype} | E=4, k=2, cf=1.5, S={B * T}, D={D}, F={F} | "
            f"{fast * 1e3:.2f} | {loop * 1e3:.2f} | {loop / fast:.2f}x |")


if __name__ == "__main__":
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {dev}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    print("| shape | device, dtype | config | fast ms | loop ms | loop / fast |\n|---|---|---|---|---|---|")
    print(bench("tiny", 256, 704, 4, 512, torch.float32, "cpu", repeats=10))
    if torch.cuda.is_available():
        print(bench("StableLM-1.6B-4e FFN", 2048, 5632, 4, 2048, torch.bfloat16, "cuda", repeats=20))
