"""Runs a researcher can trust (train.py): a run dir holds one run, a resume continues that run and touches no
other, every mistake that can be seen before the long work is an error before it, and a run that skips too much
of its data stops. In-process train.main where the outcome is an error (no torch start-up per case)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.toml")


def data_args(syn, **changes):
    args = {"data.data_path": f"{syn}/train.json", "data.image_folder": f"{syn}/images",
            "data.tokenizer_path": f"{syn}/tokenizer.json"} | changes
    return [f"--{k}={v}" for k, v in args.items()]


def run_train(argv):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", SMOKE] + argv, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return res


def snapshot(folder):
    """Every file under folder with its size and mtime: 'nothing of it was touched'."""
    return {os.path.relpath(os.path.join(d, n), folder): (os.path.getsize(os.path.join(d, n)), os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope="module")
def two_runs(synthetic, tmp_path_factory):
    """The issue's scene: a stage-II run in out/smoke and a stage-III (MoE) run in out/smoke_moe, 2 steps each."""
    tmp = tmp_path_factory.mktemp("runs")
    dense, moe = str(tmp / "smoke"), str(tmp / "smoke_moe")
    for out, extra in ((dense, []), (moe, ["--train.stage=moe", "--init.source=checkpoint", f"--init.checkpoint={dense}"])):
        train.main(["--config", SMOKE] + data_args(synthetic) + [f"--train.out_dir={out}", "--train.max_steps=2",
                                                                 "--train.save_every=1"] + extra)
    return dense, moe


def test_resume_with_another_runs_config_is_refused_and_touches_nothing(synthetic, two_runs):
    dense, moe = two_runs
    before = snapshot(dense), snapshot(moe)
    # the stage-II config (its out_dir is the dense run's) resuming the MoE run
    with pytest.raises(train.ConfigError, match="continues the run in .*smoke_moe.*writes only into its own run dir"):
        train.main(["--config", SMOKE, "--resume", moe] + data_args(synthetic) + [f"--train.out_dir={dense}"])
    # the same dir, but a setting that makes it another run
    with pytest.raises(train.ConfigError, match=r"started with other settings \(train.lr: 0.001 -> 0.01"):
        train.main(["--resume", moe, "--train.lr=1e-2"])
    with pytest.raises(train.ConfigError, match="train.stage: 'moe' -> 'finetune'"):
        train.main(["--config", SMOKE, "--resume", moe] + data_args(synthetic) + [f"--train.out_dir={moe}"])
    assert (snapshot(dense), snapshot(moe)) == before


def test_resume_continues_its_own_run_from_its_saved_config(synthetic, two_runs, tmp_path, capsys):
    _, moe = two_runs
    run = str(tmp_path / "moe")
    shutil.copytree(moe, run)
    # no --config: the checkpoint's own config (stage moe, its data, its init); only max_steps changes, printed
    train.main(["--resume", run, "--train.max_steps=3", "--train.keep_last=1"])
    out = capsys.readouterr().out
    assert "resume: train.max_steps: 2 -> 3" in out and "resume: train.keep_last: 2 -> 1" in out
    saved = json.load(open(os.path.join(run, "step_000003", "config.json")))
    assert saved["train_config"]["train"]["stage"] == "moe" and saved["train_config"]["init"]["checkpoint"].endswith("smoke")
    assert sorted(d for d in os.listdir(run) if d.startswith("step_")) == ["step_000003"]
    assert [r["step"] for r in map(json.loads, open(os.path.join(run, "log.jsonl")))] == [0, 1, 2]
    starts = json.load(open(os.path.join(run, "run.json")))["starts"]
    assert [s["resumed_from"] for s in starts] == [None, "step_000002"]


def test_keep_last_prunes_only_the_runs_own_checkpoints(synthetic, two_runs, tmp_path):
    dense, _ = two_runs
    run = str(tmp_path / "dense")
    shutil.copytree(dense, run)
    foreign = os.path.join(run, "step_000000")                        # another run's checkpoint left in the dir
    shutil.copytree(os.path.join(run, "step_000001"), foreign)
    config = json.load(open(os.path.join(foreign, "config.json")))
    json.dump(config | {"run": "0123456789abcdef"}, open(os.path.join(foreign, "config.json"), "w"))
    train.main(["--resume", run, "--train.max_steps=4", "--train.keep_last=1"])
    assert sorted(d for d in os.listdir(run) if d.startswith("step_")) == ["step_000000", "step_000004"]


def test_a_fresh_start_never_replaces_a_run_unless_asked(synthetic, two_runs, tmp_path):
    dense, _ = two_runs
    before = snapshot(dense)
    with pytest.raises(train.ConfigError, match="already holds a run .*--resume auto continues it, --train.overwrite=true"):
        train.main(["--config", SMOKE] + data_args(synthetic) + [f"--train.out_dir={dense}", "--train.lr=5e-4"])
    assert snapshot(dense) == before
    run = str(tmp_path / "dense")
    shutil.copytree(dense, run)
    train.main(["--config", SMOKE] + data_args(synthetic) + [f"--train.out_dir={run}", "--train.max_steps=1",
                                                             "--train.overwrite=true"])
    assert sorted(d for d in os.listdir(run) if d.startswith("step_")) == ["step_000001"]
    assert [r["step"] for r in map(json.loads, open(os.path.join(run, "log.jsonl")))] == [0]


def test_resume_refuses_a_changed_data_file(synthetic, two_runs, tmp_path):
    dense, _ = two_runs
    run, data = str(tmp_path / "dense"), str(tmp_path / "train.json")
    shutil.copytree(dense, run)
    records = json.load(open(f"{synthetic}/train.json"))
    json.dump(records[:-1], open(data, "w"))
    config = json.load(open(os.path.join(run, "step_000002", "config.json")))
    config["train_config"]["data"]["data_path"] = data                  # the same path, other contents
    json.dump(config, open(os.path.join(run, "step_000002", "config.json"), "w"))
    run_json = json.load(open(os.path.join(run, "run.json")))
    run_json["identity"]["data.data_path"] = data
    json.dump(run_json, open(os.path.join(run, "run.json"), "w"))
    with pytest.raises(train.ConfigError, match="holds a different run .*the data file changed since the run started"):
        train.main(["--resume", run])

# ---------------------------------------------------------------------------------------------
# Every mistake before the work: nothing here may reach the dataset


@pytest.fixture
def no_dataset(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the dataset was built before the mistake was reported")
    monkeypatch.setattr(train, "LlavaJsonDataset", fail)


@pytest.mark.parametrize("change, message", [
    ({"data.tokenizer_path": "/no/such/tokenizer.json"}, "tokenizer '/no/such/tokenizer.json' not found"),
    ({"data.data_path": "/no/such.json"}, "'/no/such.json' not found .*data.data_path"),
    ({"data.image_folder": "{syn}"}, r"data.image_folder=.*none of the first \d+ images .*is there"),
    ({"data.image_folder": "/no/such/dir"}, "data.image_folder='/no/such/dir' is not a directory"),
    ({"data.image_size": 64}, "data.image_size=64 but the vision tower takes 32-pixel images: set --data.image_size=32"),
    ({"init.source": "checkpoint", "init.checkpoint": "/no/ckpt"}, "init.checkpoint='/no/ckpt': no config.json there"),
    ({"init.source": "hf", "init.llm": "/no/llm"}, "init.llm='/no/llm': no config.json there"),
    ({"train.out_dir": "{syn}/train.json/run"}, "train.out_dir=.* is not writable"),
])
def test_a_mistake_is_reported_before_the_data_loads(synthetic, no_dataset, change, message, tmp_path):
    change = {k: str(v).format(syn=synthetic) for k, v in change.items()}
    argv = ["--config", SMOKE] + data_args(synthetic, **({"train.out_dir": str(tmp_path / "run")} | change))
    with pytest.raises(train.ConfigError, match=message):
        train.main(argv)


def test_stgc_on_a_stage_without_routing_is_an_error():
    with pytest.raises(train.ConfigError, match="stgc.enabled=true needs a stage with routed experts .*train.stage='finetune'"):
        train.load_config(SMOKE, ["--stgc.enabled=true"])
    assert train.load_config(SMOKE, ["--stgc.enabled=true", "--train.stage=moe"]).stgc.enabled


def test_json_errors_name_the_file_and_jsonl_is_read(synthetic, no_dataset, tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('[{"id": 1, "conversations": []},\n {"id": 2,, }]')
    with pytest.raises(train.ConfigError, match=rf"{bad}:2:11: Expecting property name"):
        train.main(["--config", SMOKE] + data_args(synthetic, **{"data.data_path": bad, "train.out_dir": tmp_path / "r"}))
    from data import read_records
    records = json.load(open(f"{synthetic}/train.json"))
    lines = tmp_path / "train.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records[:5]) + "\n\n")
    assert read_records(str(lines)) == records[:5]
    lines.write_text(json.dumps(records[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=rf"{lines}:2:2: .*one JSON object per line"):
        read_records(str(lines))


def test_the_command_line_error_is_one_line(synthetic, tmp_path):
    res = run_train(data_args(synthetic, **{"data.image_size": 64, "train.out_dir": tmp_path / "r"}))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: data.image_size=64 but the vision tower takes 32-pixel images: "
                                               "set --data.image_size=32"]

# ---------------------------------------------------------------------------------------------
# Skips


def test_a_run_that_skips_too_much_stops_with_the_report(synthetic, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(f"{synthetic}/images", images)
    records = json.load(open(f"{synthetic}/train.json"))
    gone = [r["image"] for r in records if "image" in r][:6]          # 6 of 64 records: 9% > 5%
    for name in gone:
        os.remove(images / name)
    out = tmp_path / "run"
    argv = ["--config", SMOKE] + data_args(synthetic, **{"data.image_folder": images, "train.out_dir": out,
                                                         "train.max_steps": 1})
    with pytest.raises(train.ConfigError, match=r"loading the data: 6 of 64 records skipped \(9.4% > data.max_skip_share=0.05: "
                                                r"missing_image 6\); see .*data_report.txt"):
        train.main(argv)
    assert "skipped missing_image: 6" in (out / "data_report.txt").read_text()
    assert not any(n.startswith("step_") for n in os.listdir(out))
    train.main(argv + ["--data.max_skip_share=0.1"])                # a knob: this share is accepted
    # found only while training (check_images_exist off: the images are read lazily): stops at the first step
    with pytest.raises(train.ConfigError, match=r"step 1: \d+ of 8 records skipped"):
        train.main(argv + [f"--train.out_dir={tmp_path}/lazy", "--data.check_images_exist=false",
                           "--data.max_skip_share=0.0"])


def test_export_refuses_an_expert_bias_it_cannot_carry(synthetic, tmp_path):
    """An aux-loss-free run routes with its bias at evaluation too; MoE-LLaVA's layout has no such tensor."""
    out = str(tmp_path / "auxfree")
    train.main(["--config", SMOKE] + data_args(synthetic) + [f"--train.out_dir={out}", "--train.max_steps=1",
                                                             "--train.stage=moe", "--moe.expert_bias=true"])
    with pytest.raises(train.ConfigError, match="aux-loss-free bias .*would route differently"):
        train.export_moe_llava(out, str(tmp_path / "hf"), drop_trained_tower=True)


def test_eval_names_a_missing_conflicts_file_before_generating(tmp_path):
    import eval as ev
    with pytest.raises(ValueError, match="--conflicts '/no/such.json' not found"):
        ev.EvalConfig(checkpoint=str(tmp_path), conflicts="/no/such.json")


def test_a_stopped_run_is_not_taken_for_a_finished_one(synthetic, tmp_path, monkeypatch):
    """After SIGINT / SIGTERM, train.main saves and raises Stopped, so demo.py / bench/experiment.py, which call it
    in-process, never evaluate a half-trained model as if it were done (train.py itself still exits 0); the signal
    handlers are back afterwards."""
    import signal
    before = signal.getsignal(signal.SIGTERM)

    class SignalAtFirstStep(train.StopRequest):
        def requested(self, world, device):
            self.name, self.stopping = "SIGTERM", True
            return True
    monkeypatch.setattr(train, "StopRequest", SignalAtFirstStep)
    out = tmp_path / "run"
    with pytest.raises(train.Stopped, match=r"stopped at step 1 of 4 \(SIGTERM\); .*step_000001 saved: continue with --resume auto"):
        train.main(["--config", SMOKE] + data_args(synthetic) + [f"--train.out_dir={out}"])
    assert (out / "step_000001" / "trainer_state.pt").is_file() and signal.getsignal(signal.SIGTERM) is before
