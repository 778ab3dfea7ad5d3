"""Real-CUDA checks, bf16 where train.py runs bf16: what the CPU tests cannot show. Skipped without a GPU.

  MoE dispatch   loop == grouped (sm90+) == padded == 'fast', under bf16 autocast over fp32 weights (train.py's
                 setting) and with plain bf16 parameters; forward and every gradient
  KV cache       cached decoding == full forward (fp32 and bf16); batched left-padded generate == one at a time
  STGC           fast == reference (fp32: the CPU test's tolerances; bf16 autocast: cosines to bf16 rounding)
  bf16           the autocast loss and gradients are close to fp32's on a tiny MoE model
  train.py       train_step with bf16 autocast, fused AdamW, activation checkpointing and STGC; a whole
                 `python train.py` stage-III run on the GPU, MFU logged

The helpers are the CPU tests' own (imported, not copied). TEST_CUDA_DEVICE=cpu runs the same tests on the CPU
with CPU autocast, so their code is exercised on a machine without a GPU (bench/gpu_suite.py --dry-run does).

    .venv/bin/python -m pytest tests/test_cuda.py           # on a CUDA machine (bench/gpu_suite.sh runs it)
"""
import os
import sys

import pytest
import torch

DEVICE = torch.device(os.environ.get("TEST_CUDA_DEVICE", "cuda"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (TEST_CUDA_DEVICE=cpu runs these tests on the CPU)", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import moe_dispatch  # noqa: E402
import train_throughput  # noqa: E402
from model import KVCache  # noqa: E402
from stgc import STGC, STGCConfig  # noqa: E402
from test_model import our_random_lm, random_ids  # noqa: E402
from test_stgc import ALPHA, batch, run, tiny_moe_lm  # noqa: E402
from test_train import data_overrides, log_of, run_train  # noqa: E402  (the synthetic fixture: conftest.py)

CUDA = DEVICE.type == "cuda"
SM90 = not CUDA or torch.cuda.get_device_capability(DEVICE) >= (9, 0)


def autocast(enabled=True):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=enabled)


def rel(a, b):
    """max |a - b| / max |b|."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def on_device(b):
    return {k: v.to(DEVICE) for k, v in b.items()}

# Order: what does not touch torch._grouped_mm first. A CUDA kernel error is sticky (every later CUDA call of
# this process fails), and under bf16 autocast on sm90+ the MoE layers' 'fast' path is the grouped kernel; the
# train.py run is its own process.

# ---------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "mistral_window3", "phi2", "stablelm2"])
def test_kv_cache_decoding_equals_full_forward(name, dtype):
    lm = our_random_lm(name).to(DEVICE, dtype)
    ids = random_ids(2, 10).to(DEVICE)
    with torch.no_grad():
        full = lm(input_ids=ids).logits                                # [2, 10, V]
        cache = KVCache(lm.cfg, 2, 10, dtype, DEVICE)
        steps = [lm(input_ids=ids[:, :6], kv_cache=cache).logits]      # prefill 6, then one at a time
        steps += [lm(input_ids=ids[:, t:t + 1], kv_cache=cache).logits for t in range(6, 10)]
    assert rel(torch.cat(steps, dim=1), full) < (1e-5 if dtype == torch.float32 else 5e-2)


def test_batched_left_padded_generate_equals_one_at_a_time():
    lm = our_random_lm("llama_gqa_llama3rope").to(DEVICE)
    prompts = [[3, 14, 15, 92, 65, 35], [8, 9], [27, 18, 28, 18]]
    single = [lm.generate(input_ids=[p], max_new_tokens=8)[0] for p in prompts]
    assert all(len(s) == 8 for s in single)
    assert lm.generate(input_ids=prompts, max_new_tokens=8) == single


def test_train_py_stage3_with_stgc_runs_on_the_gpu(synthetic, tmp_path):
    out = str(tmp_path / "run")
    res = run_train(data_overrides(synthetic) + [f"--train.out_dir={out}", "--train.max_steps=3", "--train.stage=moe",
                                                 "--stgc.enabled=True", "--train.activation_checkpointing=True"])
    log = log_of(out)
    assert len(log) == 3 and all(r["lm_loss"] == r["lm_loss"] for r in log)   # finite (not NaN)
    assert "stgc" in log[-1]
    if CUDA:
        assert "bf16 autocast" in res.stdout                           # train.py's compute line
        assert ("mfu" in log[-1]) == (train_throughput.peak_flops(DEVICE) > 0)   # logged where the peak is known

# ---------------------------------------------------------------------------------------------
# STGC


@pytest.mark.parametrize("source", ["bias", "full"])
@pytest.mark.parametrize("kind,top_k", [("ffn", 2), ("lora", 1)])
def test_stgc_fast_equals_reference_fp32(kind, top_k, source):
    lm, b = tiny_moe_lm(kind, top_k).to(DEVICE), on_device(batch())
    cfg = dict(enabled=True, grad_source=source, loss_weight=0.5, threshold=0.3)
    g_ref, c_ref, _ = run(lm, STGCConfig(impl="reference", **cfg), b)
    g_fast, c_fast, _ = run(lm, STGCConfig(impl="fast", **cfg), b)
    assert c_ref[0].conflict.sum() > 0
    assert torch.equal(c_ref[0].conflict, c_fast[0].conflict) and torch.equal(c_ref[0].pair, c_fast[0].pair)
    assert (c_ref[0].cos - c_fast[0].cos).abs().max() < 1e-4
    assert g_ref.keys() == g_fast.keys()
    for n in g_ref:
        assert (g_ref[n] - g_fast[n]).abs().max() < 1e-4 * max(1.0, g_ref[n].abs().max().item()), n

# ---------------------------------------------------------------------------------------------
# MoE dispatch in bf16


@pytest.mark.parametrize("weights", ["fp32 weights, bf16 autocast", "bf16 weights"])
@pytest.mark.parametrize("impl", ["padded", "grouped", "fast"])
def test_moe_dispatch_paths_equal_the_loop_in_bf16(impl, weights):
    if impl == "grouped" and not SM90:
        pytest.skip("torch._grouped_mm's fused CUDA kernel needs sm90+")
    dtype, amp = (torch.float32, torch.bfloat16) if weights.startswith("fp32") else (torch.bfloat16, None)
    layers = moe_dispatch.make_layers(256, 512, DEVICE, dtype, capacity_factor=1.0, impls=("loop", impl))
    x = torch.randn(4, 128, 256, device=DEVICE, dtype=dtype)
    y0, aux0, g0, rec0 = moe_dispatch.forward_backward(layers["loop"], layers["loop"], x, amp)
    y1, aux1, g1, rec1 = moe_dispatch.forward_backward(layers[impl], layers[impl], x, amp)
    assert not rec0.kept.all() and rec0.kept.any()                    # some assignments dropped, most kept
    assert torch.equal(rec0.experts, rec1.experts) and torch.equal(rec0.kept, rec1.kept)   # fp32 router: same choices
    assert rec1.router_logits.dtype == torch.float32
    assert rel(y1, y0) < 2e-2 and abs(aux1 - aux0) < 1e-6
    for a, b in zip(g1, g0):                                          # the input's, the router's, every expert's
        assert rel(a, b) < 2e-2


def test_fast_dispatch_rule_on_this_device():
    layer = moe_dispatch.make_layers(256, 512, DEVICE, torch.float32, impls=("fast",))["fast"]
    x = torch.randn(8, 256, device=DEVICE)
    with autocast():
        path = layer.path(x)
    assert path == ("grouped" if SM90 else "padded")                  # moe.dispatch_path: bf16 and sm90+ -> grouped
    assert layer.path(x) == ("grouped" if not CUDA else "padded")     # fp32 on CUDA: _grouped_mm refuses it

# ---------------------------------------------------------------------------------------------
# bf16 (the grouped kernel on sm90+)


@pytest.mark.parametrize("source", ["bias", "full"])
def test_stgc_fast_equals_reference_under_bf16_autocast(source):
    """Under autocast the two paths' per-token gradients differ by bf16 rounding (the reference's pass 1 and the
    fast path's one backward are different graphs), so: cosines close, the same verdict wherever a cosine is
    not within that rounding of the threshold, and where all verdicts agree, the same gradients to bf16 rounding."""
    lm, b = tiny_moe_lm("ffn", 2).to(DEVICE), on_device(batch())
    cfg = dict(enabled=True, grad_source=source, loss_weight=0.5, threshold=0.3)
    with autocast():
        g_ref, c_ref, _ = run(lm, STGCConfig(impl="reference", **cfg), b)
        g_fast, c_fast, _ = run(lm, STGCConfig(impl="fast", **cfg), b)
    ref, fast = c_ref[0], c_fast[0]
    assert torch.equal(ref.pair, fast.pair) and ref.conflict.sum() > 0
    assert (ref.cos - fast.cos).abs().max() < 5e-2
    clear = ref.pair & ((ref.cos - 0.3).abs() > 5e-2)
    assert torch.equal(ref.conflict[clear], fast.conflict[clear])
    if torch.equal(ref.conflict, fast.conflict):
        for n in g_ref:
            assert rel(g_fast[n], g_ref[n]) < 5e-2, n


def test_bf16_autocast_loss_and_gradients_close_to_fp32():
    lm, b = tiny_moe_lm("ffn", 2).to(DEVICE), on_device(batch())
    results = []
    for amp in (False, True):
        lm.zero_grad(set_to_none=True)
        with autocast(amp):
            out = lm(**b)
            (out.loss + ALPHA * out.aux_loss).backward()
        flat = torch.cat([p.grad.float().flatten() for p in lm.parameters() if p.grad is not None])
        results.append((out.loss.item(), flat, out.routing[0].experts))
    (loss32, g32, e32), (loss16, g16, e16) = results
    assert abs(loss16 - loss32) < 1e-2 * loss32, (loss16, loss32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert (e16 == e32).float().mean() > 0.9                          # routing mostly unchanged by bf16 upstream


def test_train_step_bf16_fused_adamw_checkpointing_and_stgc():
    ctx = train_throughput.make_ctx("moe", train_throughput.tiny_lm(), train_throughput.tiny_vision(), DEVICE)
    ctx.raw.lm.activation_checkpointing = True
    ctx.stgc = STGC(STGCConfig(enabled=True, grad_source="full"))
    assert ctx.optimizer.defaults["fused"] == CUDA                     # train.py: fused AdamW on CUDA
    dtypes = []
    ctx.raw.lm.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = {n: p.detach().clone() for n, p in ctx.raw.named_parameters() if p.requires_grad}
    batch_ = train_throughput.make_batch(2, 2048, 336, DEVICE)
    logs = [train_throughput.train_step(ctx, [batch_], step=s, total_steps=10) for s in range(2)]
    assert all("skipped_nonfinite" not in log for log in logs), logs
    assert dtypes and set(dtypes) == {torch.bfloat16 if CUDA else torch.float32}   # bf16 autocast on CUDA only
    assert all(torch.isfinite(torch.tensor(log["lm_loss"])) for log in logs)
    assert logs[-1]["stgc"] and logs[-1]["stgc"][0]["pairs"] > 0
    moved = [n for n, p in ctx.raw.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".experts." in n for n in moved) and any(".router." in n for n in moved)
    assert all(p.dtype == torch.float32 for p in ctx.raw.parameters())   # fp32 master weights
