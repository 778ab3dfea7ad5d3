"""MoE dispatch: time of one MoE forward + backward by each dispatch path, measured side by side in one run
(interleaved repeats, median), as ratios to the per-expert loop:

  loop     moe.py's per-expert loop (the readable reference: gather, run, scatter; host syncs)
  grouped  moe.py's torch._grouped_mm over the S*K assignments sorted by expert (no host sync)
  padded   moe.py's capacity-padded bmm over [E, C, D] buffers (no host sync, any dtype and GPU)
  einsum   DeepSpeed v0.9.5's capacity-buffer dispatch, which MoE-LLaVA actually trains with (written here
           from docs/moe_llava.md §1.6 steps 3-10; not a copy of DeepSpeed): a one-hot dispatch mask
           [S, E, C], einsum into zero-padded expert buffers [E, C, D], one batched matmul per projection,
           einsum back with the combine weights [S, E, C].
moe.py's impl='fast' is one of grouped / padded, chosen by `moe.dispatch_path`; the table names its choice.

Before any timing each path is checked against the loop on the batch it is timed on (output, aux loss, the
input's and every parameter's gradient), and the einsum path against moe.py's layer in fp32 with and without
dropped tokens (`check_einsum_matches`, also run by tests/test_bench.py). The CPU row runs fp32; the GPU row
the StableLM-1.6B-4e FFN (D=2048, F=5632, S=8192) in bf16 autocast over fp32 weights, as train.py runs.

    .venv/bin/python bench/moe_dispatch.py       # CPU tiny shape; on CUDA also the StableLM-1.6B-4e FFN

Writes its table into bench/RESULTS.md (the `moe_dispatch` block).
"""
import math

import torch
import torch.nn.functional as F

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, time_interleaved, update_results
from model import LMConfig, SwiGLU
from moe import MoEConfig, MoELayer, ffn_forward, router_logits

# -----------------------------------------------------------------------------
# The DeepSpeed-style path. Shape suffixes as in moe.py: S tokens, E experts, C capacity, D width.


def top2_gating(logits_SE, capacity_factor, min_capacity=0):
    """DeepSpeed v0.9.5 top2gating (docs/moe_llava.md §1.6), with the deterministic second expert that moe.py uses
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
    logits_SE = router_logits(layer.router, x_SD)                         # fp32, autocast off, as DeepSpeed
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

def available_impls():
    """moe.py's dispatch paths (MoEConfig.impl values) besides 'fast', which is one of them."""
    out = []
    for impl in ("loop", "grouped", "padded"):
        try:
            MoEConfig(impl=impl)
            out.append(impl)
        except AssertionError:       # an older moe.py: only 'fast' (grouped) and 'loop'
            pass
    return out


def make_layers(D, F_, device, dtype, capacity_factor=1.5, seed=0, impls=("fast", "loop")):
    """moe.py's layer once per impl, identical weights (E=4 experts, top-2), in `dtype`."""
    torch.manual_seed(seed)
    cfg = LMConfig(hidden_size=D, intermediate_size=F_, num_heads=8, num_layers=1, vocab_size=8)
    dense = SwiGLU(cfg).to(device=device, dtype=dtype)
    layers = {impl: MoELayer(MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor, impl=impl),
                             dense).to(device).train() for impl in impls}
    first = layers[impls[0]]
    with torch.no_grad():              # upcycled experts start identical; perturb them so a wrong expert shows
        for p in first.experts.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    for layer in layers.values():
        layer.load_state_dict(first.state_dict())
    return layers


def forward_backward(forward, layer, x, amp_dtype=None):
    """One forward + backward of mean(y^2) + aux (autocast to amp_dtype if given). Returns the output, the aux
    loss, the input's gradient, each parameter's gradient (fp32 copies) and the routing record (None: einsum)."""
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        y, extra = forward(xi)
        aux = extra if torch.is_tensor(extra) else extra.aux_loss
        (y.float().pow(2).mean() + aux).backward()
    grads = [xi.grad] + [p.grad for p in layer.parameters()]
    return y.float(), aux.float(), [g.float().clone() for g in grads], None if torch.is_tensor(extra) else extra


def max_relative_diff(a, b):
    """max |a - b| / max |b| over a list of tensor pairs (0 where b is all zero and a equals it)."""
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def check_einsum_matches(D=64, F_=96, S=256, capacity_factor=1.5, atol=1e-5):
    """fp32: the einsum path gives moe.py's output, aux loss and gradients (input, router, experts).
    Returns (max abs difference, fraction of assignments dropped by the capacity limit)."""
    layer = make_layers(D, F_, "cpu", torch.float32, capacity_factor)["fast"]
    x = torch.randn(1, S, D)
    y0, aux0, g0, record = forward_backward(layer, layer, x)
    y1, aux1, g1, _ = forward_backward(lambda x_: einsum_forward(layer, x_), layer, x)
    diff = max((a - b).abs().max().item() for a, b in zip([y0, aux0] + g0, [y1, aux1] + g1))
    assert diff < atol, f"einsum dispatch differs from moe.py's layer by {diff:.2e}"
    return diff, 1 - record.kept.float().mean().item()


def check_paths_against_loop(layers, x, amp_dtype, tol):
    """Each path (name -> forward taking x) vs the loop on x: max relative difference of the output and aux loss,
    and of all gradients. Returns name -> (output diff, gradient diff) or the exception it raised."""
    loop = layers["loop"]
    ref_y, ref_aux, ref_g, _ = forward_backward(loop, loop, x, amp_dtype)
    out = {}
    for name, (forward, layer) in paths(layers).items():
        if name == "loop":
            continue
        try:
            y, aux, g, _ = forward_backward(forward, layer, x, amp_dtype)
            d_out, d_grad = max_relative_diff([y, aux], [ref_y, ref_aux]), max_relative_diff(g, ref_g)
            assert d_out < tol and d_grad < tol, f"differs from the loop: output {d_out:.1e}, gradients {d_grad:.1e}"
            out[name] = (d_out, d_grad)
        except Exception as e:         # noqa: BLE001  (a failing path is a row, not the end of the run)
            out[name] = e
    for layer in layers.values():
        layer.zero_grad(set_to_none=True)
    return out


def paths(layers):
    """name -> (forward, the layer whose parameters it uses), in the order they are checked and timed: loop,
    padded, einsum, then grouped, last because on CUDA a failing kernel's error is sticky (every later CUDA call
    of the process fails too) and torch._grouped_mm is the path most particular about its device."""
    out = {name: (layers[name], layers[name]) for name in ("loop", "padded") if name in layers}
    out["einsum"] = (lambda x_: einsum_forward(layers["loop"], x_), layers["loop"])
    last = "grouped" if "grouped" in layers else "fast"   # an older moe.py's 'fast' is its grouped matmul
    if last in layers:
        out[last] = (layers[last], layers[last])
    return out


# -----------------------------------------------------------------------------
# Timing

TABLE = ["| shape | device, compute | path | F+B ms | loop / path | checked vs loop: output, gradients (max rel. diff) |",
         "|---|---|---|---|---|---|"]


def bench(name, D, F_, B, T, device, amp_dtype, repeats, warmup=2, emit=print):
    """Rows of TABLE for every path at one shape, then a blank line and one naming what impl='fast' runs there.
    fp32 weights, bf16 autocast when amp_dtype is set (train.py's setting). A path that fails its check or its run
    is a row saying so; the others are still timed."""
    layers = make_layers(D, F_, device, torch.float32, impls=("fast", *available_impls()))
    x = torch.randn(B, T, D, device=device)
    checked = check_paths_against_loop(layers, x, amp_dtype, tol=1e-4 if amp_dtype is None else 3e-2)
    checks = {p: c for p, c in checked.items() if not isinstance(c, Exception)}
    failed = {p: c for p, c in checked.items() if isinstance(c, Exception)}
    autocast = dict(device_type=device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def step(p, forward):
        if p in failed:
            return
        try:
            with torch.autocast(**autocast):
                y, extra = forward(x.requires_grad_(True))
                aux = extra if torch.is_tensor(extra) else extra.aux_loss
                (y.float().pow(2).mean() + aux).backward()
        except Exception as e:         # noqa: BLE001  (e.g. out of memory: this path's row says so)
            failed[p] = e

    t = time_interleaved({p: lambda p=p, f=f: step(p, f) for p, (f, _) in paths(layers).items() if p not in failed},
                         repeats, device, warmup=warmup)
    compute = f"{amp_dtype} autocast, fp32 weights" if amp_dtype else "fp32"
    shape = f"{name}: E=4, k=2, cf=1.5, S={B * T}, C={math.ceil(B * T / 4 * 1.5 * 2)}, D={D}, F={F_}"
    rows = []
    for p in paths(layers):
        if p in failed:
            msg = " ".join(str(failed[p]).split())[:200]
            rows.append(f"| {shape} | {device}, {compute} | {p} | FAILED: {type(failed[p]).__name__}: {msg} | | |")
        else:
            check = "reference" if p == "loop" else f"{checks[p][0]:.1e}, {checks[p][1]:.1e}"
            vs = f"{t['loop'] / t[p]:.2f}x" if "loop" not in failed else "n/a"
            rows.append(f"| {shape} | {device}, {compute} | {p} | {t[p] * 1e3:.2f} | {vs} | {check} |")
        emit(rows[-1])
    fast = layers["fast"]
    if hasattr(fast, "path"):
        with torch.autocast(**autocast):
            note = f"At this shape and dtype impl='fast' runs `{fast.path(x.reshape(-1, D))}` (moe.dispatch_path's rule)."
    else:
        note = "impl='fast' is the grouped matmul in this moe.py."
    for line in ("", note):
        emit(line)
    return rows + ["", note]


if __name__ == "__main__":
    set_cpu_threads()
    diff, dropped = check_einsum_matches()
    diff_drop, dropped_drop = check_einsum_matches(capacity_factor=0.5)
    check = (f"Checked first (fp32, S=256, D=64): einsum vs moe.py output, aux loss and all gradients max abs diff "
             f"{diff:.1e} at cf=1.5 ({dropped:.0%} of assignments dropped) and {diff_drop:.1e} at cf=0.5 "
             f"({dropped_drop:.0%} dropped).")
    lines = [header(), "", check, ""] + TABLE
    print("\n".join(lines))
    lines += bench("tiny", 256, 704, 4, 512, "cpu", None, repeats=10)
    if torch.cuda.is_available():
        print("\n".join(TABLE))
        lines += [""] + TABLE + bench("StableLM-1.6B-4e FFN", 2048, 5632, 4, 2048, "cuda", torch.bfloat16, repeats=20)
    else:
        lines += ["", "**Missing: the StableLM-1.6B-4e FFN shape on GPU** (D=2048, F=5632, S=8192, bf16): no GPU was "
                  "lent to this session; the script runs it automatically when CUDA is available."]
    update_results("moe_dispatch", "MoE dispatch (`bench/moe_dispatch.py`)", "\n".join(lines))
