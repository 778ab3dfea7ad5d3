"""train.py: config handling, each stage's trainable set, overfitting a fixed batch, 2-process gloo DDP and
FSDP2 against one process, bitwise-exact resume, MoE-LLaVA export. CPU only; runs train.py as users do."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from model import LanguageModel, LlavaModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.toml")


def data_overrides(syn, data_path=None):
    return [f"--data.data_path={data_path or syn + '/train.json'}", f"--data.image_folder={syn}/images",
            f"--data.tokenizer_path={syn}/tokenizer.json"]


def run_train(args, nproc=1):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", SMOKE] + args
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def log_of(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def weights(out_dir):
    latest = open(os.path.join(out_dir, "latest")).read().strip()
    return load_file(os.path.join(out_dir, latest, "model.safetensors"))

# ---------------------------------------------------------------------------------------------
# Config


def test_config_precedence_and_types():
    cfg = train.load_config(SMOKE, ["--train.lr=3e-4", "--moe.layers=[1]", "--model.lm.num_layers=3", "--train.lr=5e-4"])
    assert cfg.train.lr == 5e-4 and cfg.moe.layers == [1] and cfg.model.lm.num_layers == 3
    assert cfg.model.lm.num_kv_heads == 4 and cfg.train.global_batch_size == 8     # derived after overrides; TOML
    assert train.load_config(None, ["--train.lr=1"]).train.lr == 1.0                # int accepted for a float
    for spelling in ("false", "False"):                                              # TOML and Python booleans
        assert train.load_config(SMOKE, [f"--stgc.enabled={spelling}"]).stgc.enabled is False
    assert train.load_config(None, ["--init.checkpoint=out/run"]).init.checkpoint == "out/run"   # bare string


@pytest.mark.parametrize("override,message", [
    ("--train.learning_rate=1e-3", "unknown config key 'train.learning_rate'"),
    ("--model.lm.hidden=3", "unknown config key 'model.lm.hidden'"),
    ("--train.max_steps=1.5", "train.max_steps: expected int"),
    ("--train.activation_checkpointing=yes", "expected bool"),
    ("--train.stage=pretraining", "train.stage='pretraining' is not one of"),
    ("train.lr", "is not --section.key=value")])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(train.ConfigError, match=message):
        train.load_config(SMOKE, [override])


def test_unknown_key_in_toml_is_named(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nlr = 1e-3\n[data]\nimage_folders = 'x'\n")
    with pytest.raises(train.ConfigError, match=r"unknown config key 'data.image_folders' \(.*bad.toml\)"):
        train.load_config(str(tmp_path / "bad.toml"))

# ---------------------------------------------------------------------------------------------
# Stages


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "moe", "mole", "lora"])
def test_each_stage_trains_what_the_original_trains(stage):
    extra = ["--moe.kind=lora", "--moe.top_k=1", "--moe.attn_lora_rank=2", "--moe.lora_rank=4"] if stage == "mole" else []
    cfg = train.load_config(SMOKE, [f"--train.stage={stage}", "--train.train_vision_tower=False"] + extra)
    model = train.set_trainable(train.build_model(cfg, 100), cfg.train)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert not any(n.startswith("vision_tower.") for n in trainable)
    projector = {n for n in trainable if n.startswith("projector.")}
    lm = trainable - projector
    if stage == "pretrain":
        assert not lm and projector
    elif stage == "finetune":
        assert projector and lm == {n for n, _ in model.named_parameters() if n.startswith("lm.")}
    elif stage == "moe":   # every FFN (the dense one of layer 1 too), the routers, the projector; no attention/norms
        assert projector and all(".mlp." in n for n in lm)
        assert "lm.layers.1.mlp.gate_proj.weight" in lm and "lm.layers.0.mlp.router.weight" in lm
        assert "lm.layers.0.mlp.experts.gate_proj.weight" in lm
    else:                  # MoLE / LoRA: adapters (+ routers) and, as in LLaVA-1.5's LoRA recipe, the projector
        assert projector and all("lora_" in n or ".router." in n for n in lm)
        assert any(".router." in n for n in lm) == (stage == "mole")
        assert any(".attn." in n for n in lm) == (stage == "mole")

# ---------------------------------------------------------------------------------------------
# Runs


def test_overfits_a_fixed_batch(synthetic, tmp_path):
    records = json.load(open(f"{synthetic}/train.json"))[:8]
    json.dump(records, open(tmp_path / "eight.json", "w"))
    out = str(tmp_path / "run")
    run_train(data_overrides(synthetic, str(tmp_path / "eight.json")) +
              [f"--train.out_dir={out}", "--train.max_steps=40", "--train.lr=3e-3", "--train.grad_clip=10.0"])
    losses = [r["lm_loss"] for r in log_of(out)]
    assert len(losses) == 40 and losses[-1] < 0.25 * losses[0], losses


def test_ddp_two_processes_equal_one_process(synthetic, tmp_path):
    # MoE capacity, padding and the aux loss depend on which samples share a micro-batch (as in the original),
    # so the comparison uses one sample per micro-batch: 8 x 1 on one process, 4 x 1 on each of two ranks.
    common = data_overrides(synthetic) + ["--train.max_steps=3", "--train.stage=moe", "--stgc.enabled=True",
                                          "--train.micro_batch_size=1"]
    run_train(common + [f"--train.out_dir={tmp_path}/one"])
    run_train(common + [f"--train.out_dir={tmp_path}/two"], nproc=2)
    one, two = weights(f"{tmp_path}/one"), weights(f"{tmp_path}/two")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert [r["lm_loss"] for r in log_of(f"{tmp_path}/one")] == pytest.approx([r["lm_loss"] for r in log_of(f"{tmp_path}/two")], rel=1e-5)


def test_fsdp2_two_processes_equal_one_process(synthetic, tmp_path):
    # stage III, so the routers' own fp32 FSDP units (train.apply_fsdp) are exercised; one sample per micro-batch
    # as in the DDP test (capacity and aux depend on which samples share one)
    common = data_overrides(synthetic) + ["--train.max_steps=2", "--train.stage=moe", "--train.micro_batch_size=1"]
    run_train(common + [f"--train.out_dir={tmp_path}/one"])
    run_train(common + [f"--train.out_dir={tmp_path}/fsdp", "--train.parallel=fsdp"], nproc=2)
    one, fsdp = weights(f"{tmp_path}/one"), weights(f"{tmp_path}/fsdp")
    assert max((one[k] - fsdp[k]).abs().max().item() for k in one) < 1e-5


def test_resume_is_bitwise_identical(synthetic, tmp_path):
    common = data_overrides(synthetic) + ["--train.max_steps=6", "--train.stage=moe", "--stgc.enabled=True",
                                          "--train.micro_batch_size=2", "--train.global_batch_size=4"]
    run_train(common + [f"--train.out_dir={tmp_path}/full", "--train.save_every=3"])   # writes step 3 and step 6
    assert sorted(os.listdir(f"{tmp_path}/full")) == ["data_report.txt", "latest", "log.jsonl", "run.json",
                                                      "step_000003", "step_000006"]
    # a copy of the run as it was after step 3, but with the log of all 6 steps (a crash after step 5, say)
    shutil.copytree(f"{tmp_path}/full", f"{tmp_path}/resumed", ignore=shutil.ignore_patterns("step_000006"))
    run_train(common + [f"--train.out_dir={tmp_path}/resumed", "--resume", f"{tmp_path}/resumed/step_000003"])
    full, resumed = weights(f"{tmp_path}/full"), weights(f"{tmp_path}/resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    timing = ("step_time", "tokens_per_s")
    assert [r["step"] for r in log_of(f"{tmp_path}/resumed")] == list(range(6))      # steps 3-5 once, not twice
    assert [{k: v for k, v in r.items() if k not in timing} for r in log_of(f"{tmp_path}/full")] == \
           [{k: v for k, v in r.items() if k not in timing} for r in log_of(f"{tmp_path}/resumed")]


def test_stgc_reference_trains_and_export_round_trips(synthetic, tmp_path):
    out = f"{tmp_path}/ref"
    run_train(data_overrides(synthetic) + [f"--train.out_dir={out}", "--train.max_steps=2", "--train.stage=moe",
                                           "--stgc.enabled=True", "--stgc.impl=reference", "--stgc.grad_source=full"])
    log = log_of(out)
    assert "stgc" in log[-1] and log[-1]["stgc"][0]["pairs"] > 0
    ckpt = os.path.join(out, open(os.path.join(out, "latest")).read().strip())
    # the smoke config trains its random tower, which MoE-LLaVA's layout cannot hold: refused unless dropped knowingly
    with pytest.raises(train.ConfigError, match="vision tower was trained.*--drop-trained-tower"):
        train.export_moe_llava(out, f"{tmp_path}/hf")                  # a run dir resolves to its latest step
    train.export_moe_llava(out, f"{tmp_path}/hf", drop_trained_tower=True)
    config = json.load(open(f"{tmp_path}/hf/config.json"))
    assert config["model_type"] == "moe_llava_stablelm" and config["moe"]["num_experts"] == [4]
    ours, exported = LlavaModel.from_pretrained(ckpt).lm, LanguageModel.from_pretrained(f"{tmp_path}/hf")
    ids = torch.randint(0, 100, (2, 9))
    assert torch.equal(ours(input_ids=ids).logits, exported(input_ids=ids).logits)


def is_overlay(preset):
    """An overlay (configs/stgc.toml, ...) sets no train.stage: it is layered on a preset (--config twice)."""
    import tomllib
    return "stage" not in tomllib.load(open(os.path.join(ROOT, "configs", preset), "rb")).get("train", {})


PRESETS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".toml"))
STAGE3 = [f for f in PRESETS if not is_overlay(f) and train.load_config(os.path.join(ROOT, "configs", f)).train.stage == "moe"
          and train.load_config(os.path.join(ROOT, "configs", f)).moe.kind == "ffn"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses(preset):
    """Every preset alone; every overlay on every stage-III MoE preset (its bases: moe_llava_{stablelm,qwen,phi2})."""
    bases = [[f] for f in STAGE3] if is_overlay(preset) else [[]]
    assert STAGE3 and all(b == [] or "moe_llava" in b[0] for b in bases)
    for base in bases:
        cfg = train.load_config([os.path.join(ROOT, "configs", f) for f in base + [preset]])
        assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
        if "stgc" in preset:
            assert cfg.stgc.enabled and cfg.train.stage == "moe"
    if preset == "stgc.toml":                                          # STGC + aux-loss-free: three files, later wins
        cfg = train.load_config([os.path.join(ROOT, "configs", f) for f in ("moe_llava_stablelm.toml", "auxfree.toml", preset)])
        assert cfg.stgc.enabled and cfg.moe.expert_bias and cfg.moe.aux_loss_coef == 0.0


def test_non_finite_losses_skip_then_abort(synthetic, tmp_path):
    from safetensors.torch import save_file
    run_train(data_overrides(synthetic) + [f"--train.out_dir={tmp_path}/ok", "--train.max_steps=1"])
    ckpt = os.path.join(f"{tmp_path}/ok", open(f"{tmp_path}/ok/latest").read().strip())
    sd = load_file(f"{ckpt}/model.safetensors")
    sd["lm.norm.weight"][0] = float("nan")                           # every loss from here on is NaN
    save_file(sd, f"{ckpt}/model.safetensors")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", SMOKE, *data_overrides(synthetic),
           f"--train.out_dir={tmp_path}/nan", "--train.max_steps=20", "--init.source=checkpoint",
           f"--init.checkpoint={ckpt}", "--train.max_nonfinite=3"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "3 non-finite losses in a row" in res.stderr
    assert [r.get("skipped_nonfinite") for r in log_of(f"{tmp_path}/nan")] == [1, 2]


def test_logged_routing_statistics_cover_every_micro_batch(synthetic):
    """With accumulation the log's per-layer STGC stats and expert load are of the whole step, not of its last
    micro-batch: a step over two micro-batches counts the pairs of both (lr 0: the weights do not move)."""
    from data import LlavaJsonDataset, Tokenizer, collate
    cfg = train.load_config(SMOKE, data_overrides(synthetic) + ["--train.stage=moe", "--stgc.enabled=true", "--train.lr=0.0"])
    tok = Tokenizer.load(cfg.data.tokenizer_path, cfg.data.tokenizer_family)
    ds = LlavaJsonDataset(cfg.data, tok)
    torch.manual_seed(0)
    ctx = train.single_process_context(cfg, tok)
    mbs = [collate([ds[i] for i in range(k, k + 2)], tok.pad_id, "right", cfg.data.image_size) for k in (0, 2)]
    both = train.train_step(ctx, mbs, 5, 10)
    each = [train.train_step(ctx, [mb], 5, 10) for mb in mbs]
    assert len(both["stgc"]) == len(both["expert_load"]) >= 1
    for layer, (a, b) in enumerate(zip(each[0]["stgc"], each[1]["stgc"])):
        assert a["pairs"] > 0 and b["pairs"] > 0
        assert both["stgc"][layer]["pairs"] == a["pairs"] + b["pairs"]
        assert both["stgc"][layer]["definition"] == "objective"
    assert both["expert_load"] != each[1]["expert_load"]


def test_export_arguments_are_checked_in_one_line(tmp_path):
    for argv in (["--export-moe-llava"], ["--export-moe-llava", "x"], ["--export-moe-llava", "x", "--into", "y"]):
        with pytest.raises(train.ConfigError, match="usage: python train.py --export-moe-llava"):
            train.main(argv)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--export-moe-llava"], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().startswith("error: usage:") and "Traceback" not in res.stderr
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        train.export_moe_llava(str(tmp_path), str(tmp_path / "out"))


def test_sigterm_saves_at_the_next_step_and_resume_auto_continues(synthetic, tmp_path):
    """Preemption: SIGTERM mid-run leaves a complete checkpoint at a step boundary and exit code 0; --resume auto
    continues from it (and starts afresh where there is none); the log then has one row per step."""
    import signal
    import time
    out = f"{tmp_path}/run"
    args = data_overrides(synthetic) + [f"--train.out_dir={out}", "--train.max_steps=60", "--train.save_every=0"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", SMOKE, "--resume", "auto"] + args
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while not (os.path.isfile(log) and len(open(log).readlines()) >= 2) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-2000:]
    assert "starting afresh" in output and "stopped at step" in output
    stopped = json.load(open(os.path.join(out, open(os.path.join(out, "latest")).read().strip(), "config.json")))
    steps = [r["step"] for r in log_of(out)]
    assert 2 <= len(steps) < 60 and os.path.isfile(os.path.join(out, f"step_{len(steps):06d}", "trainer_state.pt"))
    assert stopped["format"] == "moe-vlm"
    res = run_train(["--resume", "auto"] + args)
    assert f"resuming {out}/step_{len(steps):06d}" in res.stdout
    assert [r["step"] for r in log_of(out)] == list(range(60))          # one row per step, none twice
