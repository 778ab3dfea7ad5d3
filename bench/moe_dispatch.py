"""MoE dispatch: time of one MoE forward + backward by three paths, measured side by side in one run
(interleaved repeats, median), as ratios to moe.py's fast path:

  fast    moe.py's grouped matmul over the S*K assignments sorted by expert (no host sync)
  loop    moe.py's per-expert loop (the readable reference: gather, run, scatter)
  einsum  DeepSpeed v0.9.5's capacity-buffer dispatch, which MoE-LLaVA actually trains with (written here
          from reference/moe_llava.md §1.6 steps 3-10; not a copy of DeepSpeed): a one-hot dispatch mask
          [S, E, C], einsum into zero-padded expert buffers [E, C, D], one batched matmul per projection,
          einsum back with the combine weights [S, E, C].

Before any timing the einsum path is checked against moe.py's layer (same weights, same batch): output,
aux loss and every gradient must agree (`check_einsum_matches`, also run by tests/test_bench.py).

    .venv/bin/python bench/moe_dispatch.py       # CPU tiny shape; on CUDA also the StableLM-1.6B-4e FFN (bf16)

Writes its table into bench/RESULTS.md (the `moe_dispatch` block).
"""
import math

import torch
import torch.nn.functional as F

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, time_interleaved, update_results
from model import LMConfig, SwiGLU
from moe import MoEConfig, MoELayer, ffn_forward

# -----------------------------------------------------------------------------
# The DeepSpeed-style path. Shape suffixes as in moe.py: S tokens, E experts, C capacity, D width.


def top2_gating(logits_SE, capacity_factor, min_capacity=0):
    """DeepSpeed v0.9.5 top2gating (reference §1.6), with the deterministic second expert that moe.py uses
    by default (DeepSpeed samples it with Gumbel noise; the check needs both paths to choose alike).
    Returns the aux loss, the combine weights [S, E, C] and the dispatch mask [S, E, C]."""
    S, E = logits_SE.shape
    gates_SE = logits_SE.softmax(dim=-1)                                   # fp32
    C = max(math.ceil(S / E * capacity_factor * 2), min_capacity)         # x2: two choices per token
    mask1_SE = F.one_hot(gates_SE.argmax(dim=-1), E)
    mask2_SE = F.one_hot(logits_SE.masked_fill(mask1_SE.bool(), float("-inf")).argmax(dim=-1), E)
    # Buffer slots in flattened token order; every second choice queues after all first choices.
    loc1_SE = mask1_SE.cumsum(dim=0) - 1
    loc2_SE = mask2_SE.cumsum(dim=0) - 1 + mask1_SE.sum(dim=0, keepdim=True)
    # aux = mean(me * ce) * E^2 on first choices before dropping; only me carries gradient
    aux = (gates_SE.mean(dim=0) * mask1_SE.float().mean(dim=0)).mean() * E * E
    mask1_SE = mask1_SE * (loc1_SE < C)                                    # positional dropping
    mask2_SE = mask2_SE * (loc2_SE < C)
    loc1_S, loc2_S = (loc1_SE * mask1_SE).sum(dim=1), (loc2_SE * mask2_SE).sum(dim=1)
    g1_S, g2_S = (gates_SE * mask1_SE).sum(dim=1), (gates_SE * mask2_SE).sum(dim=1)
    denom_S = (g1_S + g2_S).clamp_min(torch.finfo(gates_SE.dtype).eps)   # renormalise over the survivors
    g1_S, g2_S = g1_S / denom_S, g2_S / denom_S
    combine_SEC = (torch.einsum("se,sc->sec", g1_S[:, None] * mask1_SE, F.one_hot(loc1_S, C).to(g1_S.dtype))
                   + torch.einsum("se,sc->sec", g2_S[:, None] * mask2_SE, F.one_hot(loc2_S, C).to(g2_S.dtype)))
    return aux, combine_SEC, combine_SEC.bool()


def einsum_forward(layer: MoELayer, x):                                   # [B, T, D]
    """The layer's computation through capacity buffers, with the layer's own router and expert weights."""
    B, T, D = x.shape
    x_SD = x.reshape(-1, D)
    logits_SE = F.linear(x_SD.float(), layer.router.weight.float())       # fp32 router, as DeepSpeed
    cf = layer.cfg.capacity_factor if layer.training else layer.cfg.eval_capacity_factor
    aux, combine_SEC, dispatch_SEC = top2_gating(logits_SE, cf, layer.cfg.min_capacity)
    x_ECD = torch.einsum("sec,sd->ecd", dispatch_SEC.to(x.dtype), x_SD)   # zero rows where a slot is empty

    def linear(name, h_ECI):                                               # [E, C, in] @ [E, in, out]
        lin = getattr(layer.experts, name)
        y = torch.bmm(h_ECI, lin.weight.transpose(1, 2))
        return y if lin.bias is None else y + lin.bias[:, None]

    out_ECD = ffn_forward(layer.kind, layer.act, x_ECD, linear)           # every expert on its whole buffer
    y_SD = torch.einsum("sec,ecd->sd", combine_SEC.to(x.dtype), out_ECD)
    return y_SD.view(B, T, D), aux


# -----------------------------------------------------------------------------
# Correctness (run before timing, and by tests/test_bench.py)

def make_layers(D, F_, device, dtype, capacity_factor=1.5, seed=0):
    """moe.py's layer for 'fast' and 'loop' with identical weights (E=4 experts, top-2)."""
    torch.manual_seed(seed)
    cfg = LMConfig(hidden_size=D, intermediate_size=F_, num_heads=8, num_layers=1, vocab_size=8)
    dense = SwiGLU(cfg).to(device=device, dtype=dtype)
    layers = {impl: MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor, impl=impl),
                             dense).to(device).train() for impl in ("fast", "loop")}
    with torch.no_grad():              # upcycled experts start identical; perturb them so a wrong expert shows
        for p in layers["fast"].experts.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    layers["loop"].load_state_dict(layers["fast"].state_dict())
    return layers


def check_einsum_matches(D=64, F_=96, S=256, capacity_factor=1.5, atol=1e-5):
    """fp32: the einsum path gives moe.py's output, aux loss and gradients (input, router, experts).
    Returns (max abs difference, fraction of assignments dropped by the capacity limit)."""
    layer = make_layers(D, F_, "cpu", torch.float32, capacity_factor)["fast"]
    x = torch.randn(1, S, D)
    results = []
    for forward in (lambda x_: layer(x_), lambda x_: einsum_forward(layer, x_)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y, extra = forward(xi)
        aux = extra if torch.is_tensor(extra) else extra.aux_loss
        (y.pow(2).mean() + aux).backward()
        results.append([y, aux, xi.grad] + [p.grad.clone() for p in layer.parameters()])
        if not torch.is_tensor(extra):
            dropped = 1 - extra.kept.float().mean().item()
    diff = max((a - b).abs().max().item() for a, b in zip(*results))
    assert diff < atol, f"einsum dispatch differs from moe.py's layer by {diff:.2e}"
    return diff, dropped


# -----------------------------------------------------------------------------
# Timing


def bench(name, D, F_, B, T, dtype, device, repeats):
    layers = make_layers(D, F_, device, dtype)
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)

    def step(forward):
        y, extra = forward(x)
        aux = extra if torch.is_tensor(extra) else extra.aux_loss
        (y.float().pow(2).mean() + aux).backward()

    t = time_interleaved({"fast": lambda: step(layers["fast"]), "loop": lambda: step(layers["loop"]),
                          "einsum": lambda: step(lambda x_: einsum_forward(layers["fast"], x_))},
                         repeats, device, warmup=2)
    C = math.ceil(B * T / 4 * 1.5 * 2)
    return (f"| {name} | {device} {dtype} | E=4, k=2, cf=1.5, S={B * T}, C={C}, D={D}, F={F_} | "
            f"{t['fast'] * 1e3:.2f} | {t['loop'] * 1e3:.2f} | {t['einsum'] * 1e3:.2f} | "
            f"{t['loop'] / t['fast']:.2f}x | {t['einsum'] / t['fast']:.2f}x | {t['einsum'] / t['loop']:.2f}x |")


if __name__ == "__main__":
    set_cpu_threads()
    diff, dropped = check_einsum_matches()
    diff_drop, dropped_drop = check_einsum_matches(capacity_factor=0.5)
    check = (f"Checked first (fp32, S=256, D=64): einsum vs moe.py output, aux loss and all gradients max abs diff "
             f"{diff:.1e} at cf=1.5 ({dropped:.0%} of assignments dropped) and {diff_drop:.1e} at cf=0.5 "
             f"({dropped_drop:.0%} dropped).")
    lines = [header(), "", check, "",
             "| shape | device, dtype | config | fast ms | loop ms | einsum ms | loop / fast | einsum / fast | einsum / loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    lines.append(bench("tiny", 256, 704, 4, 512, torch.float32, "cpu", repeats=10))
    print(lines[-1])
    if torch.cuda.is_available():
        lines.append(bench("StableLM-1.6B-4e FFN", 2048, 5632, 4, 2048, torch.bfloat16, "cuda", repeats=20))
        print(lines[-1])
    else:
        lines += ["", "**Missing: the StableLM-1.6B-4e FFN shape on GPU** (D=2048, F=5632, S=8192, bf16): no GPU was "
                  "lent to this session; the script runs it automatically when CUDA is available."]
    update_results("moe_dispatch", "MoE dispatch (`bench/moe_dispatch.py`)", "\n".join(lines))
