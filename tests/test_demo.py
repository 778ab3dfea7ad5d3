"""The demo (README command 1) and the experiment script, end to end on a few samples: a broken stage,
config key or metric hook fails here instead of on a user's first run."""
import json
import os
import sys

import pytest
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import demo  # noqa: E402
import experiment  # noqa: E402

QUICK = "--train.max_steps=2 --train.global_batch_size=4 --train.micro_batch_size=2 --train.log_every=1"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    report = demo.main(["--quick", "--out", str(root / "demo"), "--data", str(root / "syn")])
    return root, report


def test_demo_runs_every_stage_and_evaluates(quick_demo):
    root, report = quick_demo
    stages = report["checkpoints"]
    assert list(stages) == ["stage1", "stage2", "stage3"]
    configs = {name: json.load(open(os.path.join(path, "config.json"))) for name, path in stages.items()}
    assert configs["stage1"]["train_config"]["data"]["template"] == "plain"          # captions
    assert configs["stage2"]["llava"]["lm"]["moe"] is None                             # dense
    moe = configs["stage3"]["llava"]["lm"]["moe"]
    assert moe["num_experts"] == 4 and moe["top_k"] == 2                              # upcycled
    assert configs["stage3"]["train_config"]["stgc"]["enabled"]
    # stage III started from stage II: the attention weights it froze are stage II's, bit for bit
    w2, w3 = load_file(os.path.join(stages["stage2"], "model.safetensors")), load_file(os.path.join(stages["stage3"], "model.safetensors"))
    key = "lm.layers.0.attn.q_proj.weight"
    assert key in w2 and (w2[key] == w3[key]).all()
    # both checkpoints went through eval.py's metric code on every synthetic benchmark
    for name in ("eval_stage2", "eval_stage3"):
        results = json.load(open(root / "demo" / name / "results.json"))["benchmarks"]
        assert set(results) == {"gqa", "scienceqa", "textvqa", "pope"}
        assert all(r["n"] > 0 for r in results.values())
    assert (root / "demo" / "eval_stage3" / "analysis" / "expert_loading.json").is_file()
    for scores in report["scores"].values():
        assert set(scores) == set(demo.DOMAINS)
        assert all(v is None or 0 <= v <= 100 for v in scores.values())
    assert report["stgc"] and 0 <= report["stgc"]["conflict_ratio_last"] <= 1
    assert json.load(open(root / "demo" / "results.json"))["scores"] == report["scores"]


def test_experiment_variants_measure_conflicts(quick_demo, capsys):
    root, report = quick_demo
    out = root / "exp"
    argv = ["--base", report["checkpoints"]["stage2"], "--data", str(root / "syn"), "--out", str(out),
            "--variants", "dense", "moe", "moe_stgc", "--seeds", "0", "--max-samples", "4", f"--extra={QUICK}"]
    runs = experiment.main(argv)
    assert set(runs) == {"dense", "moe", "moe_stgc"}
    assert runs["dense"][0]["stgc"]["step"] == []                      # no router, nothing measured
    for variant in ("moe", "moe_stgc"):                                # measured on both, CEL only on one
        curve = runs[variant][0]["stgc"]
        assert len(curve["step"]) == 2 and all(0 <= r <= 1 for r in curve["conflict_ratio"])
        assert runs[variant][0]["loading"]                             # expert loading per benchmark
    logs = {v: [json.loads(line) for line in open(out / f"{v}_s0" / "log.jsonl")] for v in ("moe", "moe_stgc")}
    # a CEL wherever there were conflicts (cel sums the step's micro-batches; the stats are its last one)
    assert all(row["cel"] > 0 or all(s["conflict_ratio"] == 0 for s in row["stgc"]) for row in logs["moe_stgc"])
    train_cfg = lambda v: json.load(open(out / f"{v}_s0" / "step_000002" / "config.json"))["train_config"]  # noqa: E731
    assert train_cfg("moe")["stgc"]["loss_weight"] == 0.0 and train_cfg("moe_stgc")["stgc"]["loss_weight"] > 0
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 3 and "moe_stgc (n=1)" in table
    assert "| load variance | purity | top pathway (seed 0) |" in table
    # a rerun reuses the finished runs instead of training again
    capsys.readouterr()
    experiment.main(argv)
    assert "stage moe" not in capsys.readouterr().out
    # ... but only what the same settings, base, data and code produced: another eval sample count reruns it
    again = argv[:argv.index("--variants")] + ["--variants", "moe_auxfree", "--seeds", "0", "--max-samples", "3",
                                                f"--extra={QUICK}"]
    runs = experiment.main(again)
    assert runs["moe_auxfree"][0]["key"]["max_samples"] == 3
    experiment.main(again[:-3] + ["--max-samples", "2", f"--extra={QUICK}"])
    assert "moe_auxfree_s0 was produced by other settings, base, data or code: rerunning it" in capsys.readouterr().out


def test_data_rebuilt_when_built_with_other_parameters(tmp_path, capsys):
    """`demo.py --quick` then `demo.py`: the full demo must not train on the quick set left in --data."""
    small = dict(seed=0, n_train=6, n_val=2, n_test=4, image_size=32)
    larger = small | dict(n_train=10)
    d = str(tmp_path / "syn")
    train_size = lambda: len(json.load(open(os.path.join(d, "train.json"))))   # noqa: E731
    demo.build_data(d, small)
    assert train_size() == 6 and demo.built_with(d) == small
    meta = os.path.join(d, "meta.json")
    stamp = os.stat(meta).st_mtime_ns
    demo.build_data(d, small)                                            # same parameters: kept as it is
    assert os.stat(meta).st_mtime_ns == stamp and "using the synthetic set" in capsys.readouterr().out
    demo.build_data(d, larger)
    assert train_size() == 10 and demo.built_with(d) == larger
    assert "n_train=6 (asked 10): rebuilding" in capsys.readouterr().out
    assert demo.DATA["n_train"] == 4000 and demo.QUICK_DATA["n_train"] == 64     # what the two modes ask for
