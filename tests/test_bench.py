"""The bench scripts' correctness checks at tiny size (what each script asserts before it times anything);
no timing is asserted here."""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import common  # noqa: E402
import dense_vs_hf  # noqa: E402
import eval_throughput  # noqa: E402
import gpu_suite  # noqa: E402
import moe_dispatch  # noqa: E402
import train_throughput  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, restored afterwards: on the shared 2-core dev machine a 2-thread team with a preempted
    thread made the decoding test ~80x slower (50 s vs 0.6 s); see bench/common.py."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_einsum_dispatch_equals_moe_layer():
    diff, dropped = moe_dispatch.check_einsum_matches()                     # asserts output, aux, all grads
    assert diff < 1e-5 and dropped == 0.0
    diff, dropped = moe_dispatch.check_einsum_matches(capacity_factor=0.5)  # C = S/4: the capacity limit bites
    assert diff < 1e-5 and dropped > 0.2


def test_einsum_dispatch_check_is_not_vacuous():
    """A wrong capacity (one slot short) must be caught by the same comparison."""
    layer = moe_dispatch.make_layers(64, 96, "cpu", torch.float32, capacity_factor=0.5)["fast"]
    x = torch.randn(1, 256, 64)
    y_ref, _ = layer(x)
    layer.cfg.capacity_factor = 63 / 128                                    # C = 63, one slot short of 64
    y, _ = moe_dispatch.einsum_forward(layer, x)
    assert (y - y_ref).abs().max() > 1e-3


def test_dense_matches_transformers():
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    hf, ours = dense_vs_hf.build_pair(dense_vs_hf.tiny_config(), "cpu", torch.float32)
    loss_diff, grad_diff = dense_vs_hf.check_agreement(hf, ours, ids, tol=1e-4)
    assert loss_diff < 1e-5 and grad_diff < 1e-4


def test_dense_matches_transformers_stablelm_family():
    """The GPU row's config (StableLM-2: LayerNorm, qkv bias, partial rotary), shrunk."""
    cfg = dense_vs_hf.stablelm_1_6b_config()
    cfg = type(cfg)(**(cfg.to_dict() | dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4)))
    hf, ours = dense_vs_hf.build_pair(cfg, "cpu", torch.float32, std=0.05)
    assert ours.cfg.family == "stablelm" and ours.cfg.rotary_dim == 4 and ours.cfg.qkv_bias
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    dense_vs_hf.check_agreement(hf, ours, ids, tol=1e-4)


def test_check_agreement_catches_a_wrong_weight():
    hf, ours = dense_vs_hf.build_pair(dense_vs_hf.tiny_config(), "cpu", torch.float32)
    with torch.no_grad():
        ours.layers[2].mlp.up_proj.weight[0, 0] += 1e-2
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    try:
        dense_vs_hf.check_agreement(hf, ours, ids, tol=1e-4)
    except AssertionError:
        return
    raise AssertionError("a perturbed weight went unnoticed")


def test_three_generate_paths_agree():
    hf, ours = eval_throughput.build_models(dense_vs_hf.tiny_config(), "cpu", torch.float32)
    prompts = eval_throughput.make_prompts(6, 2048)
    assert len({len(p) for p in prompts}) > 1                               # left padding is exercised
    for max_new in (4, 24):
        assert eval_throughput.check_same_tokens(hf, ours, prompts, max_new, batch_size=4) == 1.0
    answers = eval_throughput.ours_batched(ours, prompts, 24, 4)
    assert all(len(set(a)) > 4 for a in answers)                            # varied tokens, not a 2-token loop


def test_train_throughput_step_and_flops():
    """One train.py step at the tiny proportional shape: the LM sees 2048 positions, 576 of them image features,
    the loss is finite, and the FLOP count splits into the documented terms."""
    ctx = train_throughput.make_ctx("moe", train_throughput.tiny_lm(), train_throughput.tiny_vision(), torch.device("cpu"))
    seen = []
    ctx.raw.lm.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["inputs_embeds"].shape), with_kwargs=True)
    batch = train_throughput.make_batch(1, 2048, 336, "cpu")
    train_throughput.step(ctx, batch, checkpointing=True)
    assert seen == [torch.Size([1, train_throughput.SEQ, 128])]
    assert ctx.raw.cfg.vision.num_features == train_throughput.IMAGE_TOKENS
    lm = ctx.raw.lm
    expert = sum(p.numel() for n, p in lm.named_parameters() if ".mlp.experts." in n)
    other = sum(p.numel() for n, p in lm.named_parameters() if ".mlp.experts." not in n and not n.startswith("embed_tokens"))
    attn = 12 * 4 * 128 * 2048
    tower = sum(p.numel() for p in ctx.raw.vision_tower.parameters())
    expected = (6 * (other + expert * 2 / 4) + attn) * 2048 + 2 * tower * 577
    assert abs(train_throughput.flops_per_step(ctx.raw, 2048, 1) - expected) < 1e-6 * expected


def test_update_results_keeps_the_text_around_the_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nprose before\n\n<!-- begin x -->\nold\n<!-- end x -->\n\nprose after\n")
    common.update_results("x", "X", "new table", str(path))
    common.update_results("y", "Y (`bench/y.py`)", "y table", str(path))
    text = path.read_text()
    assert "prose before" in text and "prose after" in text and "old" not in text
    assert "<!-- begin x -->\nnew table\n<!-- end x -->" in text
    assert text.endswith("## Y (`bench/y.py`)\n\n<!-- begin y -->\ny table\n<!-- end y -->\n")


# ---------------------------------------------------------------------------------------------
# bench/gpu_suite.py: the driver (its parts' code runs in full with `--dry-run`, under 2 minutes)


def test_gpu_suite_dry_run_writes_a_copy_not_results_md(tmp_path):
    """One part end to end, as the GPU run does it: a child process, its rows into the gpu_suite block of a copy of
    RESULTS.md, the log and results.json beside it; bench/RESULTS.md untouched."""
    before = open(common.RESULTS).read()
    res = subprocess.run([sys.executable, os.path.join(common.ROOT, "bench", "gpu_suite.py"), "--dry-run", "--parts",
                          "dispatch", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert open(common.RESULTS).read() == before
    text = (tmp_path / "RESULTS.md").read_text()
    block = text[text.index("<!-- begin gpu_suite -->"):text.index("<!-- end gpu_suite -->")]
    assert "**Dry run**" in block and "| dispatch | ok |" in block
    for path in ("loop", "padded", "einsum", "grouped"):                 # each path checked against the loop, timed
        assert f"fp32 weights | {path} |" in block
    assert "<!-- begin moe_dispatch -->" in text                         # the rest of RESULTS.md is kept
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and [r["name"] for r in results["results"]] == ["dispatch"]
    assert "=== part dispatch: ok" in (tmp_path / "gpu_suite.log").read_text()


def test_gpu_suite_part_that_fails_or_overruns_keeps_its_rows(tmp_path):
    log = gpu_suite.Log(str(tmp_path / "log"))
    script = ("import sys; sys.path.insert(0, {bench!r}); import gpu_suite as g; "
              "g.PART_FUNCS['x'] = lambda dry: (g.emit('| measured |'), {then}); g.child('x', True)")
    bench = os.path.join(common.ROOT, "bench")
    failed = gpu_suite.run_part("x", [sys.executable, "-c", script.format(bench=bench, then="1 / 0")], 60, log,
                                str(tmp_path / "rows"))
    assert failed["status"] == "FAILED: ZeroDivisionError: division by zero" and failed["rows"] == ["| measured |"]
    # the rows file written by hand (no torch import to wait for), then a sleep past the cap
    slow = ("import json, os, time; open(os.environ[{env!r}], 'a').write(json.dumps({{'row': '| measured |'}}) + '\\n'); "
            "time.sleep(120)").format(env=gpu_suite.ROWS_ENV)
    slow = gpu_suite.run_part("x", [sys.executable, "-c", slow], 3, log, str(tmp_path / "rows"))
    assert slow["status"].startswith("FAILED: timed out after") and slow["rows"] == ["| measured |"]
    assert slow["seconds"] < 20                                          # the child's process group was ended
    block = gpu_suite.block("header", False, [failed | {"name": "train"}], 480, 10)
    assert "| train | FAILED: ZeroDivisionError: division by zero |" in block and "| measured |" in block


def test_gpu_suite_lists_its_parts_and_refuses_a_dry_run_into_results_md(tmp_path, capsys):
    assert gpu_suite.main(["--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(gpu_suite.PARTS)
    assert set(gpu_suite.PARTS) == set(gpu_suite.PART_FUNCS)
    assert sum(cap for cap, _ in gpu_suite.PARTS.values()) <= gpu_suite.BUDGET - 20      # 8 minutes, with room
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry-run", "--results", common.RESULTS, "--out", str(tmp_path)])


def test_stgc_agreement_deepest_layer_exact_and_pairs_equal():
    """bench/stgc_agreement.py's measurement: the deepest MoE layer sees no deeper router loss, so fast and reference
    agree exactly there (the shallower ones may differ by definition); both find the same pairs (asserted inside)."""
    import stgc_agreement
    rows = stgc_agreement.disagreement((0.5,), range(2))[0.5]
    assert len(rows) == 4 and rows[-1][0] == 0 and rows[-1][1] > 0
