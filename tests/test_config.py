"""One home per setting (issue 17): [moe] on a checkpoint that already has MoE layers (runtime knobs applied to
the model and saved once, structure refused by name), overrides checked against the fields' declared types, fields
that are not user-settable refused, presets layered; train.py and eval.py answer --help."""
import dataclasses
import json
import os

import pytest

import train
from data import build_synthetic_dataset
from model import LlavaModel
from moe import RUNTIME_FIELDS, STRUCTURAL_FIELDS, MoEConfig, is_routed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.toml")


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A stage-III checkpoint of the smoke model (4 experts, layers 0; capacity 1.5, aux 0.01), never trained."""
    root = tmp_path_factory.mktemp("moe_ckpt")
    cfg = train.load_config(SMOKE, ["--train.stage=moe"])
    model = train.build_model(cfg, 100)
    model.save_pretrained(str(root / "ckpt"), {"train_config": dataclasses.asdict(cfg)})
    return str(root / "ckpt")


def from_checkpoint(ckpt, *overrides):
    return train.load_config(SMOKE, ["--train.stage=moe", "--init.source=checkpoint", f"--init.checkpoint={ckpt}",
                                     *overrides])


def test_moe_runtime_knobs_apply_to_a_loaded_moe_model(moe_checkpoint):
    """The issue's run: --moe.capacity_factor=3.0 --moe.aux_loss_coef=0.5 on a checkpoint with MoE layers trained
    with capacity 1.5 (the layers kept 1.5 before)."""
    cfg = from_checkpoint(moe_checkpoint, "--moe.capacity_factor=3.0", "--moe.aux_loss_coef=0.5", "--moe.impl=loop")
    model = train.build_model(cfg, 100)
    layers = [b.mlp for b in model.lm.layers if is_routed(b.mlp)]
    assert layers and all(m.cfg.capacity_factor == 3.0 and m.cfg.impl == "loop" for m in layers)
    assert model.lm.cfg.moe.capacity_factor == 3.0 and model.lm.cfg.moe.aux_loss_coef == 0.5
    moe, changes = train.resolve_moe(cfg, LlavaModel.from_pretrained(moe_checkpoint).lm.cfg.moe, 2)
    assert changes == ["moe.capacity_factor: 1.5 -> 3.0", "moe.aux_loss_coef: 0.01 -> 0.5", "moe.impl: 'fast' -> 'loop'"]
    assert moe == model.lm.cfg.moe                                      # what the loop, the log and DDP read


@pytest.mark.parametrize("override,mine,theirs", [
    ("--moe.num_experts=8", "moe.num_experts=8", "moe.num_experts=4"),
    ("--moe.layers=dense", "moe.layers='dense'", "moe.layers='sparse'"),
    ("--moe.kind=lora", "moe.kind='lora'", "moe.kind='ffn'")])
def test_a_structural_moe_difference_is_refused_naming_both_values(moe_checkpoint, override, mine, theirs):
    cfg = from_checkpoint(moe_checkpoint, override, *(["--moe.top_k=1"] if "lora" in override else []))
    with pytest.raises(train.ConfigError) as e:
        train.build_model(cfg, 100)
    assert mine in str(e.value) and theirs in str(e.value) and "structural" in str(e.value)


def test_unasked_moe_settings_stay_the_checkpoints(moe_checkpoint, tmp_path):
    """A key that no file or override gives is the checkpoint's, even where the dataclass default differs."""
    ckpt = str(tmp_path / "ckpt")
    model = LlavaModel.from_pretrained(moe_checkpoint)
    model.lm.set_moe(dataclasses.replace(model.lm.cfg.moe, eval_capacity_factor=1.25))
    model.save_pretrained(ckpt)
    loaded = train.build_model(from_checkpoint(ckpt), 100)
    assert loaded.lm.cfg.moe.eval_capacity_factor == 1.25              # MoEConfig's default is 2.0
    assert all(b.mlp.cfg.eval_capacity_factor == 1.25 for b in loaded.lm.layers if is_routed(b.mlp))


def test_every_moe_field_is_runtime_or_structural():
    names = [f.name for f in dataclasses.fields(MoEConfig)]
    assert sorted(RUNTIME_FIELDS + STRUCTURAL_FIELDS) == sorted(names)
    assert not set(RUNTIME_FIELDS) & set(STRUCTURAL_FIELDS)


def test_the_run_saves_one_moe_config_and_prints_the_changes(moe_checkpoint, tmp_path, capsys):
    syn = str(tmp_path / "syn")
    build_synthetic_dataset(syn, seed=0, n_train=16, n_val=2, n_test=2, image_size=32)
    out = str(tmp_path / "run")
    saved = train.main(["--config", SMOKE, "--train.stage=moe", "--init.source=checkpoint",
                        f"--init.checkpoint={moe_checkpoint}", "--moe.capacity_factor=3.0", "--moe.aux_loss_coef=0.5",
                        f"--data.data_path={syn}/train.json", f"--data.image_folder={syn}/images",
                        f"--data.tokenizer_path={syn}/tokenizer.json", f"--train.out_dir={out}", "--train.max_steps=1",
                        "--model.lm.vocab_size=1024"])
    assert "[moe] changes their runtime settings: moe.capacity_factor: 1.5 -> 3.0; moe.aux_loss_coef: 0.01 -> 0.5" \
        in capsys.readouterr().out
    config = json.load(open(os.path.join(saved, "config.json")))
    assert config["llava"]["lm"]["moe"] == config["train_config"]["moe"]          # one version, not two
    assert config["train_config"]["moe"]["capacity_factor"] == 3.0 and config["llava"]["lm"]["moe"]["aux_loss_coef"] == 0.5


@pytest.mark.parametrize("override,message", [
    ("--model.lm.moe=3", r"model\.lm\.moe is not user-settable: the MoE layers are configured by the \[moe\] section"),
    ("--model.lm.rope_scaling=5", r"model\.lm\.rope_scaling: expected dict, got 5"),
    ("--moe.capacity_factor=true", r"moe\.capacity_factor: expected float, got True"),
    ("--train.adam_betas=0.9", r"train\.adam_betas: expected list, got 0\.9"),
    ("--data.image_mean=0.5", r"data\.image_mean: expected tuple \| None, got 0\.5"),
    ("--moe.layers=3", r"moe\.layers: expected object, got 3"),
    ("--model.lm=3", r"model\.lm is a section: set its keys")])
def test_overrides_are_checked_against_the_declared_field_types(override, message):
    with pytest.raises(train.ConfigError, match=message):
        train.load_config(SMOKE, [override])


def test_declared_types_accept_what_they_declare():
    cfg = train.load_config(SMOKE, ["--model.lm.rope_scaling={rope_type = 'linear', factor = 2.0}",
                                    "--data.image_mean=[0.5, 0.5, 0.5]", "--moe.capacity_factor=2"])
    assert cfg.model.lm.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.data.image_mean == (0.5, 0.5, 0.5) and cfg.moe.capacity_factor == 2.0
    assert {"model.lm.rope_scaling", "data.image_mean", "moe.capacity_factor", "train.stage"} <= cfg.given


def test_presets_layer_later_files_win(tmp_path):
    (tmp_path / "a.toml").write_text("[train]\nlr = 1e-3\nseed = 3\n")
    (tmp_path / "b.toml").write_text("[train]\nlr = 2e-3\n")
    cfg = train.load_config([SMOKE, str(tmp_path / "a.toml"), str(tmp_path / "b.toml")], ["--train.seed=4"])
    assert cfg.train.lr == 2e-3 and cfg.train.seed == 4 and cfg.train.max_steps == 4   # smoke's own value kept
    args = train.parse_args(["--config", SMOKE, "--config", str(tmp_path / "b.toml"), "--train.seed=4"])
    assert args.config == [SMOKE, str(tmp_path / "b.toml")] and args.overrides == ["--train.seed=4"]


@pytest.mark.parametrize("script", ["train", "eval"])
def test_entry_points_answer_help(script, capsys):
    """`python train.py --help` / `python eval.py --help` exit 0 (in process: the same parser, no interpreter start)."""
    import eval as ev
    with pytest.raises(SystemExit) as e:
        (train.main if script == "train" else ev.main)(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:")
    flags = ("--config", "--resume", "--export-moe-llava", "--to", "--section.key=value", "later files") if script == "train" \
        else ("--checkpoint", "--image", "--question")
    assert all(flag in out for flag in flags)
