"""Every config enum fails at parse time with a ConfigError naming the key, the bad value and the allowed values
(issue 15, item 4), also under `python -O`, which strips asserts."""
import ast
import os

import pytest

import train
from data import FAMILIES, TEMPLATES
from eval import EvalConfig
from model import ACTIVATIONS
from moe import MoEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENUMS = {   # key: allowed values (the contract, written out rather than read back from the code)
    "train.stage": ("pretrain", "finetune", "moe", "mole", "lora"),
    "train.dtype": ("bf16", "fp32"),
    "train.parallel": ("ddp", "fsdp"),
    "init.source": ("scratch", "hf", "checkpoint"),
    "moe.kind": ("ffn", "lora"),
    "moe.second_expert": ("top2", "gumbel"),
    "moe.impl": ("fast", "grouped", "padded", "loop"),
    "moe.layers": ("sparse", "first_half", "second_half", "dense"),
    "stgc.grad_source": ("bias", "full"),
    "stgc.impl": ("fast", "reference"),
    "stgc.mean_scope": ("rank", "global"),
    "stgc.layer_reduction": ("sum", "mean"),
    "model.projector": ("mlp2x_gelu", "linear"),
    "model.lm.family": ("llama", "stablelm", "phi", "qwen"),
    "model.lm.norm": ("rmsnorm", "layernorm"),
    "model.lm.mlp": ("swiglu", "gelu"),
    "model.lm.act": tuple(ACTIVATIONS),
    "model.vision.kind": ("clip", "siglip"),
    "model.vision.select_feature": ("patch", "cls_patch"),
    "model.vision.act": tuple(ACTIVATIONS),
    "data.template": tuple(TEMPLATES),
    "data.tokenizer_family": tuple(FAMILIES),
    "data.image_processor": ("clip", "siglip"),
    "data.image_aspect": ("pad", "square"),
    "data.resize_backend": ("pil", "tensor"),
    "data.overlength": ("truncate", "skip"),
}


@pytest.mark.parametrize("key", ENUMS)
def test_enum_error_names_key_value_and_choices(key):
    bad = ENUMS[key][0] + "x"                                          # a misspelling: 'biasx', 'sparsex', ...
    with pytest.raises(train.ConfigError) as e:
        train.load_config(overrides=[f"--{key}={bad}"])
    msg = str(e.value)
    assert msg.startswith("invalid config: ") and f"{key}={bad!r}" in msg, msg
    assert all(repr(v) in msg for v in ENUMS[key]), msg


def test_the_issue_example_reads_as_one_line():
    with pytest.raises(train.ConfigError) as e:
        train.load_config(overrides=["--stgc.grad_source=biass"])
    assert str(e.value) == "invalid config: stgc.grad_source='biass' is not one of ('bias', 'full')"


def test_rope_type():
    with pytest.raises(train.ConfigError, match=r"model\.lm\.rope_scaling\.rope_type='yarn' is not one of "
                                                r"\('default', 'linear', 'llama3'\)"):
        train.load_config(overrides=["--model.lm.rope_scaling={rope_type='yarn'}"])


def test_moe_layers_fail_at_parse_time():
    # before: 'spares' passed parsing and failed (an assert) only when stage III built the model
    with pytest.raises(train.ConfigError, match=r"moe\.layers='spares' is not one of \('sparse',.*list of layer"):
        train.load_config(overrides=["--moe.layers=spares"])
    with pytest.raises(train.ConfigError, match=r"moe\.layers=\[0, -1\]"):
        train.load_config(overrides=["--moe.layers=[0, -1]"])
    with pytest.raises(ValueError, match=r"moe\.layers=\[1, 6\] out of range for 6 layers \(0\.\.5\)"):
        MoEConfig(layers=[1, 6]).layer_indices(6)


@pytest.mark.parametrize("override,message", [
    ("--moe.top_k=5", r"moe\.top_k=5 must be in 1\.\.moe\.num_experts=4"),
    ("--moe.num_experts=1 --moe.top_k=1", r"moe\.num_experts=1: an 'ffn' MoE needs at least 2 experts"),
    ("--moe.kind=lora", r"moe\.top_k=2: LLaVA-MoLE .* set top_k=1"),
    ("--model.lm.num_kv_heads=5", r"model\.lm\.num_heads=32 is not a multiple of num_kv_heads=5"),
    ("--model.vision.select_layer=30", r"model\.vision\.select_layer=30 out of range for num_layers=24"),
])
def test_other_user_input_checks_name_the_key(override, message):
    with pytest.raises(train.ConfigError, match=message):
        train.load_config(overrides=override.split())


@pytest.mark.parametrize("key,allowed", [("dtype", ("auto", "float32", "bfloat16", "float16")),
                                         ("template", tuple(TEMPLATES))])
def test_eval_enums(key, allowed):
    with pytest.raises(ValueError) as e:
        EvalConfig(checkpoint="out/none", **{key: "fp16x"})
    assert f"--{key}='fp16x' is not one of" in str(e.value) and all(repr(v) in str(e.value) for v in allowed)


CONFIG_METHODS = {"train.py": ("TrainConfig", "InitConfig"), "moe.py": ("MoEConfig",), "stgc.py": ("STGCConfig",),
                  "model.py": ("VisionConfig", "LMConfig", "LlavaConfig"), "data.py": ("DataConfig",),
                  "eval.py": ("EvalConfig",)}


@pytest.mark.parametrize("file", CONFIG_METHODS)
def test_no_assert_checks_user_input(file):
    """`python -O` strips asserts, so a config check written as one would let a bad value through. (A `python -O`
    subprocess would test the same end to end, but recompiles torch without a bytecode cache: ~15 s.)"""
    tree = ast.parse(open(os.path.join(ROOT, file)).read())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in CONFIG_METHODS[file]):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("__post_init__", "layer_indices")):
            asserts = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Assert)]
            assert not asserts, f"{file}: {cls.name}.{fn.name} checks with assert at lines {asserts}"
