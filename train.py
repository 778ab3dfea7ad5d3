"""
train.py: every training stage of MoE-LLaVA / LLaVA-MoLE, with STGC, in one script.

    python train.py --config configs/demo.toml                                   # one process, CPU or GPU
    torchrun --nproc_per_node=8 train.py --config configs/moe_llava_stablelm.toml --config configs/stgc.toml \
             --train.out_dir=out/moe_llava_stablelm_stgc --train.lr=2e-5          # a preset, an overlay, overrides
    python train.py --config configs/X.toml --resume out/X/latest                # continue exactly
    torchrun --max-restarts=3 ... train.py --config configs/X.toml --resume auto  # its latest checkpoint, if any
Ctrl-C or SIGTERM (preemption) saves a checkpoint at the next step boundary and exits cleanly.
    python train.py --export-moe-llava out/X/step_000100 --to out/X_hf            # MoE-LLaVA / HF layout
    python train.py --help                                                       # every flag and section

Stages (docs/moe_llava.md §1.9; one table: STAGES below):
  pretrain  stage I: the projector trains; plain template.
  finetune  stage II: the LLM and the projector train.
  moe       stage III: dense MLPs upcycled into experts (moe.py); every FFN (dense ones too), the routers and
            the projector train, as the original really does (its `train_modules` + projector).
  mole      LLaVA-MoLE: LoRA experts (+ routers, + optional attention LoRA) train; all else frozen.
  lora      plain LoRA (moe.LoRALinear) on every MLP projection, no router: the MoLE paper's baseline.
The vision tower is frozen unless train.train_vision_tower (the demo trains its tower from scratch).

The objective of one optimizer step, every term in one place (see `train_step`):
  sum over micro-batches and ranks of  CE_sum / N_global  +  alpha * aux / accum  +  beta * CEL / accum
N_global counts the supervised tokens of all micro-batches on all ranks (the LM loss is a mean over the
global batch, not a mean of micro-batch means); aux and CEL are means over micro-batches, as in MoE-LLaVA.

Config: TOML presets in configs/ with sections [train] [init] [model] [moe] [stgc] [data], mapped onto the
dataclasses TrainConfig, InitConfig, LlavaConfig (model.py), MoEConfig (moe.py), STGCConfig (stgc.py),
DataConfig (data.py). Precedence: dataclass defaults < each --config file in order (an overlay such as
configs/stgc.toml holds only what it changes) < --section.key=value (TOML syntax, type-checked against the
field's declared type). An unknown key, or one that is not user-settable, is an error naming it.
When the starting checkpoint already has MoE layers, they are its: [moe]'s runtime knobs (moe.RUNTIME_FIELDS)
are applied to them and printed, a structural difference (moe.STRUCTURAL_FIELDS) is an error (resolve_moe).
"""
import argparse
import ast
import json
import math
import os
import random
import shutil
import signal
import sys
import textwrap
import time
import tomllib
import typing
from contextlib import nullcontext
from types import UnionType
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (DataConfig, DataError, LlavaJsonDataset, ModalityLengthGroupedSampler, Tokenizer, collate, file_sha256,
                  read_records)
from model import (IGNORE_INDEX, LanguageModel, LlavaConfig, LlavaModel, VisionConfig, VisionTower, Projector, latest_checkpoint,
                   saved_moe_config, setup_distributed, to_hf_state_dict)
from moe import (RUNTIME_FIELDS, STRUCTURAL_FIELDS, MoEConfig, MoELayer, check_choice, is_moe_trainable, is_routed,
                 sequence_aux_loss, update_expert_bias, z_loss)
from stgc import STGC, STGCConfig, kind_stats_from_totals, stats_from_totals
from routing import KINDS, layer_sums, layer_stats, sums_width, token_kinds

# -----------------------------------------------------------------------------
# Stages: every rule that depends on the stage, in one table (docs/moe_llava.md §1.9)


@dataclass(frozen=True)
class Stage:
    lm: str                # which LM parameters train: 'none' | 'all' | 'moe' (moe.is_moe_trainable of the MoE kind)
    install: str           # what a dense LM gets first: '' | 'moe' (the [moe] layers) | 'mole' ([moe], kind 'lora')
                           # | 'lora' (plain LoRA: [moe]'s LoRA settings, one expert, no router, every layer)
    routed: bool           # its layers have routers, so STGC can run
    template: str          # the conversation template its data is written in ('' = a chat template)
    grouped: bool          # batches grouped by modality and length (LLaVA's group_by_modality_length)


STAGES = {
    "pretrain": Stage(lm="none", install="", routed=False, template="plain", grouped=False),
    "finetune": Stage(lm="all", install="", routed=False, template="", grouped=True),
    "moe": Stage(lm="moe", install="moe", routed=True, template="", grouped=True),
    "mole": Stage(lm="moe", install="mole", routed=True, template="", grouped=True),
    "lora": Stage(lm="moe", install="lora", routed=False, template="", grouped=True),
}
# The projector trains in every stage: I and II by design; III and LoRA because LLaVA's initialize_vision_modules
# re-enables it after the LoRA/MoE freezing ("in case it is frozen by LoRA", docs/moe_llava.md §1.9).
ROUTED_STAGES = tuple(name for name, st in STAGES.items() if st.routed)   # ('moe', 'mole')

# -----------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    stage: str = "finetune"            # a key of STAGES: pretrain | finetune | moe | mole | lora
    out_dir: str = "out/run"
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0                 # > 0: stop after this many optimizer steps (else `epochs`)
    global_batch_size: int = 128       # samples per optimizer step, all ranks
    micro_batch_size: int = 8          # samples per forward on one rank; accumulation fills the rest
    lr: float = 2e-5
    projector_lr: float = 0.0          # 0: same as lr (MoE-LLaVA's mm_projector_lr is unused)
    min_lr_ratio: float = 0.0          # cosine decays to lr * min_lr_ratio (HF's cosine goes to 0)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0          # MoE-LLaVA: 0; biases and norms never decay
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0             # HF Trainer's max_grad_norm
    dtype: str = "bf16"                # bf16 autocast on CUDA (fp32 master weights); CPU always runs fp32
    parallel: str = "ddp"              # ddp | fsdp (FSDP2 fully_shard: for models that do not fit DDP)
    activation_checkpointing: bool = False
    train_vision_tower: bool = False   # the demo trains a small tower from scratch; the papers never do
    num_workers: int = 0
    log_every: int = 1
    save_every: int = 0                # 0: only at the end
    keep_last: int = 2                 # step_* checkpoints kept (of this run: see run_fingerprint)
    overwrite: bool = False            # a fresh start in an out_dir holding a run's checkpoints replaces that run
    max_nonfinite: int = 5             # consecutive non-finite losses (skipped steps) before aborting

    def __post_init__(self):
        check_choice("train.stage", self.stage, STAGES)
        check_choice("train.dtype", self.dtype, ("bf16", "fp32"))
        check_choice("train.parallel", self.parallel, ("ddp", "fsdp"))


@dataclass
class InitConfig:
    source: str = "scratch"            # scratch ([model] sizes) | hf (llm + vision_tower dirs) | checkpoint
    llm: str = ""                      # hf: an HF LLM dir (StableLM-2, Phi-2, Qwen, Llama, ...)
    vision_tower: str = ""             # hf: CLIP/SigLIP dir; checkpoint: the tower of a LLaVA/MoE-LLaVA dir
    checkpoint: str = ""               # ours (a previous stage), or a LLaVA / MoE-LLaVA dir

    def __post_init__(self):
        check_choice("init.source", self.source, ("scratch", "hf", "checkpoint"))


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    model: LlavaConfig = field(default_factory=LlavaConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    stgc: STGCConfig = field(default_factory=STGCConfig)
    data: DataConfig = field(default_factory=DataConfig)


class ConfigError(ValueError):
    pass


def _defaults(cls) -> dict:
    """A dataclass's field defaults as a nested dict, before any __post_init__ fills derived values."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default                                    # e.g. LMConfig.moe = None stays None
        elif is_dataclass(f.type):
            out[f.name] = _defaults(f.type)
        else:
            out[f.name] = f.default_factory()
    return out


# Fields a config file or override may not set, and why (each refused by name).
NOT_SETTABLE = {"model.lm.moe": "the MoE layers are configured by the [moe] section (and train.stage)"}


def _types(cls) -> dict:
    """A dataclass's declared field types as a nested dict (nested dataclasses as dicts): what _merge checks."""
    hints = typing.get_type_hints(cls)
    return {f.name: _types(hints[f.name]) if is_dataclass(hints[f.name]) and f.default is MISSING else hints[f.name]
            for f in fields(cls)}


def _type_ok(typ, value) -> bool:
    if typ is object:                                                  # moe.layers: a placement name or indices
        return isinstance(value, (str, list))
    if typ is float:
        return type(value) in (int, float)
    if typ in (bool, int, str):
        return type(value) is typ                                      # bool is not an int here
    if typing.get_origin(typ) in (typing.Union, UnionType):   # e.g. tuple | None
        return any(_type_ok(t, value) for t in typing.get_args(typ))
    if typ in (list, tuple):
        return isinstance(value, list)                                 # TOML arrays
    if typ is dict:
        return isinstance(value, dict)
    return typ is type(None) and value is None


def _merge(base: dict, new: dict, types: dict, where: str, given: set, prefix=""):
    """Merge `new` into `base` (both nested dicts), each value checked against its field's declared type."""
    for key, value in new.items():
        name = prefix + key
        if name in NOT_SETTABLE:
            raise ConfigError(f"{name} is not user-settable: {NOT_SETTABLE[name]} ({where})")
        if key not in types:
            raise ConfigError(f"unknown config key {name!r} ({where})")
        typ = types[key]
        if isinstance(typ, dict):                                      # a section ([model.lm], ...)
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section: set its keys ({name}.KEY=VALUE), not {value!r} ({where})")
            _merge(base[key], value, typ, where, given, name + ".")
            continue
        if not _type_ok(typ, value):
            shown = getattr(typ, "__name__", str(typ))
            raise ConfigError(f"{name}: expected {shown}, got {value!r} ({where})")
        base[key] = float(value) if typ is float else value
        given.add(name)


def parse_override(item: str) -> dict:
    """'--section.key=value' -> {'section': {'key': value}}; the value in TOML syntax (true, 1e-3, [1, 2]), as in the
    preset files, or a Python literal (True), or else a bare string."""
    key, eq, raw = item.lstrip("-").partition("=")
    if not eq:
        raise ConfigError(f"override {item!r} is not --section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(paths=None, overrides=(), base: dict | None = None) -> Config:
    """Defaults (or `base`, a saved config being resumed) < each TOML file of `paths` in order (one path or a list:
    a preset, then overlays) < overrides ('section.key=value'). The keys set by files and overrides (all of them
    for `base`) are recorded as cfg.given: resolve_moe applies only what was asked for."""
    d = json.loads(json.dumps(base)) if base is not None else _defaults(Config)
    types, given = _types(Config), set(flat(base)) if base is not None else set()
    for path in [paths] if isinstance(paths, str) else paths or []:
        with open(path, "rb") as f:
            _merge(d, tomllib.load(f), types, path, given)
    for item in overrides:
        _merge(d, parse_override(item), types, f"override --{item.lstrip('-')}", given)
    try:
        cfg = Config(train=TrainConfig(**d["train"]), init=InitConfig(**d["init"]), model=LlavaConfig(**d["model"]),
                     moe=MoEConfig(**d["moe"]), stgc=STGCConfig(**d["stgc"]), data=DataConfig(**d["data"]))
    except (AssertionError, ValueError, TypeError) as e:
        raise ConfigError(f"invalid config: {e}") from None
    if cfg.stgc.enabled and cfg.train.stage not in ROUTED_STAGES:
        raise ConfigError(f"stgc.enabled=true needs a stage with routed experts ({' or '.join(ROUTED_STAGES)}), but "
                          f"train.stage={cfg.train.stage!r}: drop --stgc.enabled or set --train.stage=moe")
    if not 0 <= cfg.data.max_skip_share <= 1:
        raise ConfigError(f"data.max_skip_share={cfg.data.max_skip_share} is not a share in [0, 1]")
    cfg.given = frozenset(given)                                       # not a field: not saved, not in the identity
    return cfg


def stage_moe(cfg: Config) -> MoEConfig:
    """The MoE layers this stage installs on a dense LM (STAGES[stage].install)."""
    install = STAGES[cfg.train.stage].install
    if install == "lora":                                              # plain LoRA: MoLE's LoRA settings, 1 expert
        return replace(cfg.moe, kind="lora", num_experts=1, top_k=1, layers="dense")
    if install == "mole" and cfg.moe.kind != "lora":
        raise ConfigError("stage 'mole' needs moe.kind = 'lora' (and moe.top_k = 1)")
    return cfg.moe


def resolve_moe(cfg: Config, start: MoEConfig | None, num_layers: int, where="the starting checkpoint"):
    """(the MoE config of this run, its changes as 'key: old -> new' lines). With no MoE in the starting model: the
    stage's (stage_moe; unused by a dense stage). With one: the checkpoint's layers stay its own. Of the [moe] keys
    given (in a file or override; every key in a Config built in code), a runtime knob (moe.RUNTIME_FIELDS:
    capacities, coefficients, impl, second expert) replaces the checkpoint's value, and a structural one
    (moe.STRUCTURAL_FIELDS: expert count, layers, kind, LoRA shapes) must equal it."""
    install = STAGES[cfg.train.stage].install
    wanted = stage_moe(cfg) if install else cfg.moe
    if start is None:
        return wanted, []
    given = getattr(cfg, "given", None)
    given = ({k[len("moe."):] for k in given if k.startswith("moe.")} if given is not None
             else {f.name for f in fields(MoEConfig)})
    if install == "lora":
        given |= {"kind", "num_experts", "top_k", "layers"}           # set by the stage itself
    value = lambda moe, k: moe.layer_indices(num_layers) if k == "layers" else getattr(moe, k)   # noqa: E731
    for k in STRUCTURAL_FIELDS:
        if k in given and value(wanted, k) != value(start, k):
            raise ConfigError(f"moe.{k}={getattr(wanted, k)!r}, but {where} has MoE layers built with moe.{k}="
                              f"{getattr(start, k)!r}: a structural setting of existing layers cannot change; drop "
                              f"it (the checkpoint's is used) or start from a dense checkpoint")
    runtime = {k: getattr(wanted, k) for k in RUNTIME_FIELDS if k in given and getattr(wanted, k) != getattr(start, k)}
    return replace(start, **runtime), [f"moe.{k}: {getattr(start, k)!r} -> {v!r}" for k, v in runtime.items()]


# -----------------------------------------------------------------------------
# Model: build or load, set the stage's trainable parameters


def start_checkpoint(cfg: Config, resume: str | None = None) -> str:
    """The checkpoint dir the model starts from: the resumed one, or init.checkpoint's latest; '' otherwise."""
    return resume or (latest_checkpoint(cfg.init.checkpoint) if cfg.init.source == "checkpoint" else "")


def build_model(cfg: Config, vocab_size: int, resume: str | None = None) -> LlavaModel:
    """The model of cfg.init (a resume: its own checkpoint's weights), with the MoE layers of the stage: installed
    on a dense LM (STAGES[stage].install), or, where the checkpoint has them, its own with resolve_moe's knobs."""
    src = cfg.init
    if resume or src.source == "checkpoint":
        model = LlavaModel.from_pretrained(start_checkpoint(cfg, resume), vision_tower=None if resume else src.vision_tower or None)
    elif src.source == "scratch":
        if cfg.model.lm.vocab_size < vocab_size:
            raise ConfigError(f"model.lm.vocab_size={cfg.model.lm.vocab_size} < the tokenizer's {vocab_size}")
        model = LlavaModel(cfg.model)
    else:
        tower = VisionTower.from_pretrained(src.vision_tower, select_layer=cfg.model.vision.select_layer,
                                            select_feature=cfg.model.vision.select_feature)
        lm = LanguageModel.from_pretrained(src.llm)
        with torch.device("meta"):                                    # nothing random built only to be replaced
            model = LlavaModel(replace(cfg.model, vision=tower.cfg, lm=lm.cfg))   # [model]'s other settings kept
        model.vision_tower, model.lm = tower, lm
        model.projector = Projector(cfg.model.projector, tower.cfg.hidden_size, lm.cfg.hidden_size,   # fresh
                                    cfg.model.image_start_end)
    moe, _ = resolve_moe(cfg, model.lm.cfg.moe, model.lm.cfg.num_layers)
    if model.lm.cfg.moe is not None:
        model.lm.set_moe(moe)                                         # the runtime knobs asked for (printed by main)
    elif STAGES[cfg.train.stage].install:
        model.lm.install_moe(moe)                                     # stage III upcycling, MoLE or LoRA (moe.py)
    return model


def set_trainable(model: LlavaModel, cfg: TrainConfig):
    """Which parameters train in each stage (STAGES[stage].lm; docs/moe_llava.md §1.9)."""
    model.requires_grad_(False)
    rule = STAGES[cfg.stage].lm
    kind = model.lm.cfg.moe.kind if model.lm.cfg.moe is not None else None
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            p.requires_grad_(True)                                     # every stage (see STAGES)
        elif name.startswith("lm."):
            p.requires_grad_(rule == "all" or (rule == "moe" and is_moe_trainable(name[len("lm."):], kind)))
        elif name.startswith("vision_tower."):
            p.requires_grad_(cfg.train_vision_tower)
    return model


def param_groups(model, cfg: TrainConfig):
    """Per-component groups (projector may have its own lr); no weight decay on biases and norms."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        component = name.split(".")[0] if name.startswith("projector.") else "main"
        decay = p.dim() >= 2 and "norm" not in name
        g = groups.setdefault((component, decay), {"params": [], "names": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                                    "lr_scale": (cfg.projector_lr / cfg.lr) if component == "projector" and cfg.projector_lr else 1.0})
        g["params"].append(p)
        g["names"].append(name)
    return [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def lr_at(step, total_steps, cfg: TrainConfig):
    """Linear warmup, then cosine to lr * min_lr_ratio: a pure function of the step (nothing to checkpoint)."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def apply_fsdp(model: LlavaModel, bf16: bool):
    """FSDP2: the tower as one unit, each decoder block as one, the root last; bf16 params, fp32 reduction.
    Each MoE router is its own unit with fp32 params: the block's bf16 policy would otherwise hand the router
    bf16 weights, and MoE-LLaVA's gate is fp32 (moe.router_logits)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard(model.vision_tower, mp_policy=mp)
    for block in model.lm.layers:
        if is_routed(block.mlp):
            fully_shard(block.mlp.router, mp_policy=fp32)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def describe_compute(model: LlavaModel, device, bf16: bool) -> str:
    """One line saying how this run computes: autocast dtype, and the MoE dispatch path moe.py will take."""
    line = f"compute: {device}, " + ("bf16 autocast over fp32 master weights" if bf16 else "fp32")
    layers = [b.mlp for b in model.lm.layers if isinstance(b.mlp, MoELayer)]
    if layers:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            path = layers[0].path(torch.empty(0, model.lm.cfg.hidden_size, device=device))
        line += f"; MoE dispatch: {path} (moe.dispatch_path, impl={layers[0].cfg.impl!r})"
    return line


def flops_per_step(model: LlavaModel, tokens: int, images: int) -> float:
    """Model FLOPs of one step: 6 * active LM parameters per token (experts counted at top_k / E; embeddings
    excluded, lm_head included) + 12 * layers * D * T per token for attention scores (T ~ tokens per
    sequence, approximated by 2048), + 2 * tower parameters per image patch token (frozen tower: forward
    only). Routers and norms are negligible."""
    lm, active = model.lm, 0
    for name, p in lm.named_parameters():
        if name.startswith("embed_tokens"):
            continue
        frac = 1.0
        if ".mlp.experts." in name:
            frac = lm.cfg.moe.top_k / lm.cfg.moe.num_experts
        active += p.numel() * frac
    attn = 12 * lm.cfg.num_layers * lm.cfg.hidden_size * 2048
    tower = sum(p.numel() for p in model.vision_tower.parameters())
    return (6 * active + attn) * tokens + 2 * tower * model.cfg.vision.num_positions * images


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops(device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)

# -----------------------------------------------------------------------------
# Checkpoints: weights (safetensors), optimizer, sampler position, RNG, step, config; atomic; keep last K


def save_checkpoint(ctx, step, consumed_in_epoch, epoch):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(ctx.model, options=opts)          # collective under FSDP
    optim_sd = get_optimizer_state_dict(ctx.model, ctx.optimizer, options=opts)
    final = os.path.join(ctx.cfg.train.out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.raw.save_pretrained(tmp, ctx.extra_config, state_dict=model_sd)
        ctx.tokenizer.tk.save(os.path.join(tmp, "tokenizer.json"))      # tiktoken sources saved converted
        torch.save({"step": step, "epoch": epoch, "optimizer": optim_sd, "nonfinite": ctx.nonfinite,
                    "sampler": ctx.sampler.state_dict(samples_consumed=consumed_in_epoch)},
                   os.path.join(tmp, "trainer_state.pt"))
    if ctx.world > 1:
        dist.barrier()
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate()}, os.path.join(tmp, f"rng_rank{ctx.rank}.pt"))
    if ctx.world > 1:
        dist.barrier()
    if ctx.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)                                         # atomic: a crash leaves step_*.tmp only
        with open(os.path.join(ctx.cfg.train.out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(ctx.cfg.train.out_dir, "latest.tmp"), os.path.join(ctx.cfg.train.out_dir, "latest"))
        ours = [d for d in run_checkpoints(ctx.cfg.train.out_dir)      # never another run's (or an unstamped) checkpoint
                if checkpoint_run(os.path.join(ctx.cfg.train.out_dir, d)) == ctx.extra_config["run"]]
        for old in ours[:-ctx.cfg.train.keep_last] if ctx.cfg.train.keep_last > 0 else []:
            shutil.rmtree(os.path.join(ctx.cfg.train.out_dir, old))
    if ctx.world > 1:
        dist.barrier()
    return final


def tower_was_trained(checkpoint) -> bool:
    """Whether this checkpoint's vision tower was trained by it or by a stage it started from (config.json's
    "vision_tower_trained", written by main; older checkpoints: their own train config only)."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    if "vision_tower_trained" in config:
        return bool(config["vision_tower_trained"])
    return bool(config.get("train_config", {}).get("train", {}).get("train_vision_tower", False))


def resolve_resume(path, out_dir):
    """--resume DIR: that checkpoint (a run dir: its latest). --resume auto: the run dir's latest complete
    checkpoint if there is one (what a restarted job wants: torchrun --max-restarts), else None (start afresh)."""
    if path == "auto":
        found = latest_checkpoint(out_dir)
        if not os.path.isfile(os.path.join(found, "trainer_state.pt")):
            print(f"--resume auto: no checkpoint in {out_dir} yet, starting afresh")
            return None
        print(f"--resume auto: resuming {found}")
        return found
    path = latest_checkpoint(path)
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise FileNotFoundError(f"--resume {path}: no trainer_state.pt there (expected a step_* checkpoint dir)")
    return path

# -----------------------------------------------------------------------------
# Run identity: a run dir holds one run, and a resume continues that run as it was started
#
# run.json in the run dir: the config's identity (every setting but RESUMABLE ones), the data file's sha256, the
# fingerprint of both (also written into each checkpoint's config.json as "run"), and the code version of each start
# and resume. A fresh start refuses a dir holding another run's checkpoints (train.overwrite replaces it); --resume
# takes the checkpoint's own saved config, refuses settings that would change the run, writes only into the
# checkpoint's run dir, and truncates log.jsonl to the resumed step; keep_last prunes only this run's checkpoints.

# Settings that change how long or how a run executes, not what it computes: a resume may change them (printed).
# max_steps / epochs: the cosine schedule then spans the new total from the resumed step on (lr_at is a function
# of step and total), so the lr jumps to the new curve's value: printed with the values.
RESUMABLE = ("train.max_steps", "train.epochs", "train.log_every", "train.save_every", "train.keep_last",
             "train.num_workers", "train.max_nonfinite", "train.overwrite", "train.out_dir", "train.parallel",
             "train.activation_checkpointing", "moe.impl", "stgc.measure", "data.check_images_exist", "data.strict",
             "data.max_skip_share")
CODE_FILES = ("data.py", "model.py", "moe.py", "stgc.py", "train.py")


def flat(d: dict, prefix="") -> dict:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}, JSON-normalised (tuples are lists), for comparing configs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = json.loads(json.dumps(v))
    return out


def code_version() -> str:
    """sha256 (first 12 hex) of the source files a run executes: recorded, not part of the identity (a resume
    after a bug fix is allowed, and printed)."""
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    return hashlib.sha256(b"".join(open(os.path.join(here, n), "rb").read() for n in CODE_FILES)).hexdigest()[:12]


def run_identity(cfg: Config, data_sha256: str) -> dict:
    import hashlib
    identity = {k: v for k, v in flat(asdict(cfg)).items() if k not in RESUMABLE}
    blob = json.dumps([identity, data_sha256], sort_keys=True).encode()
    return {"run": hashlib.sha256(blob).hexdigest()[:16], "data_sha256": data_sha256, "identity": identity}


def config_differences(a: dict, b: dict, keys=None) -> list[str]:
    """'key: a -> b' for each flat key (of `keys`, default all) whose values differ."""
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def run_checkpoints(out_dir: str) -> list[str]:
    """The complete step_* checkpoints in out_dir (a crash leaves only step_*.tmp, never counted)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(out_dir, d, "trainer_state.pt")))


def checkpoint_run(path: str) -> str | None:
    """The run fingerprint a checkpoint's config.json carries (None: saved before runs had one)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("run")
    except (OSError, json.JSONDecodeError):
        return None


def resumed_config(checkpoint: str, config_path, overrides) -> Config:
    """The config to resume `checkpoint` with: the one it saved, plus overrides of RESUMABLE settings. With
    --config (config_path: the list of files) they are read as well and must describe the same run; out_dir is the
    checkpoint's run dir."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        saved = json.load(f).get("train_config")
    if saved is None:
        raise ConfigError(f"--resume {checkpoint}: its config.json has no train_config (not a train.py checkpoint)")
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    saved["train"]["out_dir"] = run_dir                              # the run dir as it is now (it may have moved)
    was = flat(saved)
    asked = load_config(config_path, overrides) if config_path else load_config(None, overrides, base=saved)
    now = flat(asdict(asked))
    explicit_dir = config_path or any(o.lstrip("-").startswith("train.out_dir=") for o in overrides)
    if explicit_dir and os.path.abspath(asked.train.out_dir) != run_dir:
        raise ConfigError(f"--resume {checkpoint} continues the run in {run_dir}, but train.out_dir={asked.train.out_dir}: a "
                          f"resume writes only into its own run dir; pass --train.out_dir={run_dir} (or resume a checkpoint of "
                          f"{asked.train.out_dir})")
    asked.train.out_dir = run_dir
    changed = config_differences(was, flat(asdict(asked)), [k for k in sorted(now) if k not in RESUMABLE])
    if changed:
        raise ConfigError(f"--resume {checkpoint}: the run there was started with other settings ({'; '.join(changed[:4])}"
                          f"{f'; {len(changed) - 4} more' if len(changed) > 4 else ''}); a resume continues that run as it "
                          f"was: drop these settings, or start a new run in another --train.out_dir")
    for line in config_differences(was, flat(asdict(asked)), [k for k in RESUMABLE if k != "train.out_dir"]):
        print(f"resume: {line}")
    return asked


def claim_run_dir(cfg: Config, resume: str | None, rank: int) -> dict:
    """Check that cfg.train.out_dir may take this run (see the section comment), write its run.json, and return
    the run's identity. Rank 0 writes; every rank checks (all raise the same error)."""
    out = cfg.train.out_dir
    ident = run_identity(cfg, file_sha256(cfg.data.data_path))
    path = os.path.join(out, "run.json")
    old = json.load(open(path)) if os.path.isfile(path) else None
    code = code_version()
    if resume:
        if old is not None and old["run"] != ident["run"]:
            what = ("the data file changed since the run started (sha256 " f"{old['data_sha256'][:12]} -> {ident['data_sha256'][:12]})"
                    if old["identity"] == ident["identity"] else
                    "; ".join(config_differences(old["identity"], ident["identity"])[:4]))
            raise ConfigError(f"--resume: {out} holds a different run than this one ({what}); resume it with what it was "
                              f"started with, or start a new run in another --train.out_dir")
        if old is not None and old["starts"][-1]["code"] != code:
            print(f"resume: the code changed since the last start ({old['starts'][-1]['code']} -> {code}; {', '.join(CODE_FILES)})")
        starts = (old["starts"] if old else []) + [{"code": code, "resumed_from": os.path.basename(resume),
                                                     "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
    else:
        found = run_checkpoints(out)
        if found and not cfg.train.overwrite:
            raise ConfigError(f"{out} already holds a run (checkpoints {', '.join(found[-2:])}): --resume auto continues it, "
                              f"--train.overwrite=true replaces it, or choose another --train.out_dir")
        if rank == 0:
            for name in found + [n for n in ("latest", "log.jsonl", "run.json", "data_report.txt")
                                 if os.path.isfile(os.path.join(out, n))]:
                (shutil.rmtree if name.startswith("step_") else os.remove)(os.path.join(out, name))
            if found:
                print(f"train.overwrite: removed the previous run in {out} ({len(found)} checkpoints, its log)")
        starts = [{"code": code, "resumed_from": None, "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
    if rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(ident | {"starts": starts}, f, indent=1)
        os.replace(path + ".tmp", path)
    return ident


def truncate_log(path: str, step: int):
    """Keep the rows of the steps before `step` (a row's "step" counts from 0; step_N holds N steps), so that
    after a resume every step has exactly one row."""
    if not os.path.isfile(path):
        return
    rows = [line for line in open(path) if line.strip() and json.loads(line).get("step", -1) < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# Before any long work: every path, the cross-field constraints, the output dir


def check_before_work(cfg: Config, records: list):
    """What can be checked before the dataset is built and the model loaded: each failure a ConfigError naming
    the setting, the value and the fix. Enums and value ranges are checked when the config is built."""
    d, src = cfg.data, cfg.init
    if d.image_folder and not os.path.isdir(d.image_folder):
        raise ConfigError(f"data.image_folder={d.image_folder!r} is not a directory (the JSON's 'image' paths are relative to it)")
    sample = [os.path.join(d.image_folder, p) for rec in records[:256] if isinstance(rec, dict)
              for p in ([rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image") or [])
              if isinstance(p, str)][:64]
    if sample and not any(os.path.isfile(p) for p in sample):
        raise ConfigError(f"data.image_folder={d.image_folder!r}: none of the first {len(sample)} images of {d.data_path} is "
                          f"there (e.g. {sample[0]}); point --data.image_folder at the folder the 'image' paths are relative to")
    for key, path in (("init.llm", src.llm), ("init.vision_tower", src.vision_tower)) if src.source == "hf" else ():
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{key}={path!r}: no config.json there (init.source = 'hf' needs a local HF model dir)")
    if src.source == "checkpoint":
        start = latest_checkpoint(src.checkpoint)
        if not os.path.isfile(os.path.join(start, "config.json")):
            raise ConfigError(f"init.checkpoint={src.checkpoint!r}: no config.json there (expected a step_* dir, a run dir, "
                              "or a LLaVA / MoE-LLaVA dir)")
        if src.vision_tower and not os.path.isfile(os.path.join(src.vision_tower, "config.json")):
            raise ConfigError(f"init.vision_tower={src.vision_tower!r}: no config.json there")
    tower = tower_image_size(cfg)
    if tower is not None and tower != d.image_size:
        raise ConfigError(f"data.image_size={d.image_size} but the vision tower takes {tower}-pixel images: set "
                          f"--data.image_size={tower}")
    try:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        probe = os.path.join(cfg.train.out_dir, f".write_test.{os.getpid()}")   # one per rank: ranks check at once
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"train.out_dir={cfg.train.out_dir!r} is not writable ({e.strerror}): choose another") from None


def tower_image_size(cfg: Config) -> int | None:
    """The image side the vision tower is built for, read from configs only (None: not known without loading)."""
    src = cfg.init
    if src.source == "scratch":
        return cfg.model.vision.image_size
    folder = src.vision_tower or (latest_checkpoint(src.checkpoint) if src.source == "checkpoint" else "")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("format") == "moe-vlm":                              # ours: the tower is inside
        return saved["llava"]["vision"]["image_size"]
    if src.vision_tower:                                               # an HF CLIP / SigLIP dir
        return VisionConfig.from_hf(saved).image_size
    return None                                                        # an HF LLaVA dir: the tower is elsewhere


def check_skips(stats, n_skipped: int, n_drawn: int, max_share: float, out_dir: str, rank: int, when: str):
    """Stop when more than max_share of the records drawn so far were skipped; the report goes to
    out_dir/data_report.txt as well as into the error."""
    share = n_skipped / max(n_drawn, 1)
    if share > max_share:
        if rank == 0:
            with open(os.path.join(out_dir, "data_report.txt"), "w") as f:
                f.write(stats.report(max_examples=20) + "\n")
        counts = ", ".join(f"{r} {n}" for r, n in stats.counts().most_common())
        raise ConfigError(f"{when}: {n_skipped} of {n_drawn} records skipped ({share:.1%} > data.max_skip_share="
                          f"{max_share}: {counts}); see {out_dir}/data_report.txt, fix the data or raise --data.max_skip_share")

# -----------------------------------------------------------------------------
# The training loop


@dataclass
class Context:
    cfg: Config
    model: torch.nn.Module             # wrapped (DDP / FSDP) or raw
    raw: LlavaModel
    optimizer: torch.optim.Optimizer
    sampler: ModalityLengthGroupedSampler
    rank: int
    world: int
    device: torch.device
    extra_config: dict
    tokenizer: Tokenizer = None
    stgc: STGC = None
    nonfinite: int = 0
    probe: STGC = None                 # stgc.measure without STGC: conflict statistics only (made by train_step)


def single_process_context(cfg: Config, tokenizer: Tokenizer) -> Context:
    """One CPU process's Context for cfg's stage (model built as `build_model` does, its trainable set, AdamW, STGC as
    configured): what tests and bench scripts drive `train_step` with, without main's run dir or data loading."""
    model = set_trainable(build_model(cfg, tokenizer.vocab_size), cfg.train).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train), lr=cfg.train.lr)
    return Context(cfg, model, model, optimizer, None, 0, 1, torch.device("cpu"), {}, tokenizer,
                   STGC(cfg.stgc) if cfg.stgc.enabled else None)


def all_reduce_sum(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def train_step(ctx: Context, micro_batches, step, total_steps):
    """One optimizer step over `micro_batches` (this rank's share of the global batch)."""
    cfg, model, device = ctx.cfg, ctx.model, ctx.device
    accum = len(micro_batches)
    n_local = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    n_global = all_reduce_sum(torch.tensor(float(n_local), device=device), ctx.world)
    if n_global.item() == 0:
        raise RuntimeError(f"step {step}: the whole global batch has no supervised token (check the template)")
    lr = lr_at(step, total_steps, cfg.train)
    for g in ctx.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    bf16 = cfg.train.dtype == "bf16" and device.type == "cuda"
    sums = torch.zeros(4, device=device)                              # LM CE sum, aux, CEL, beta * CEL (weighted)
    load_LE = stgc_LT = None                                           # expert counts, STGC totals: whole step
    route_LX = None                                                    # routing.layer_sums | z, seq aux | per-kind totals
    moe_cfg = ctx.raw.lm.cfg.moe                                       # the model's MoE settings (one home: resolve_moe)
    E, K = (moe_cfg.num_experts, moe_cfg.top_k) if moe_cfg is not None else (0, 0)
    coef = moe_cfg or cfg.moe                                          # a dense model's router terms are all 0
    stgc = ctx.stgc                                                    # STGC, or its statistics alone (stgc.measure)
    if stgc is None and cfg.stgc.measure and moe_cfg is not None:
        ctx.probe = ctx.probe or STGC(replace(cfg.stgc, impl="fast"), measure_only=True)
        stgc = ctx.probe
    if stgc is not None:
        stgc.set_step(step, total_steps)                               # tau, beta: schedules of the step
    P = ctx.raw.cfg.image_positions                                    # per image: features (+ MoLE's start / end)
    for i, mb in enumerate(micro_batches):
        last = i == accum - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()   # DDP: reduce once
        if hasattr(model, "set_requires_gradient_sync"):              # FSDP2: the same
            model.set_requires_gradient_sync(last)
        batch = {k: mb[k].to(device) for k in ("input_ids", "attention_mask", "labels", "images")}
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                forward = lambda: model(batch["input_ids"], batch["images"], labels=batch["labels"],
                                        attention_mask=batch["attention_mask"])
                conflicts = None
                if ctx.stgc is not None and ctx.stgc.cfg.impl == "reference":
                    conflicts = ctx.stgc.reference_conflicts(forward)     # pass 1 (paper): LM-loss gradients only
                out = forward()
                # per MoE layer [L]: z-loss and sequence aux (moe.py), with a graph only where they train
                z_L, seq_L = (router_terms(out.routing, coef.z_loss_coef, z_loss),
                              router_terms(out.routing, coef.seq_aux_loss_coef, sequence_aux_loss))
                # ---- the objective: every term here -------------------------------------------------
                lm_term = out.loss * out.num_tokens * ctx.world / n_global   # CE sum / N_global (DDP averages ranks)
                aux_term = coef.aux_loss_coef * out.aux_loss / accum         # alpha * sum over MoE layers of aux
                loss = lm_term + aux_term
                if coef.z_loss_coef > 0:                                    # ST-MoE router z-loss, summed over layers
                    loss = loss + coef.z_loss_coef * z_L.sum() / accum
                if coef.seq_aux_loss_coef > 0:                              # per-sample aux, summed over layers
                    loss = loss + coef.seq_aux_loss_coef * seq_L.sum() / accum
                if conflicts is not None:
                    loss = loss + ctx.stgc.cel(out.routing, conflicts, scale=1 / accum)   # beta * CEL, pass 2
                elif stgc is not None and out.routing:
                    stgc.attach(out.routing, scale=1 / accum)              # beta * CEL gradient, in this backward
                # (aux-loss-free balancing adds no term: its bias moves after the optimizer step, below)
                # -------------------------------------------------------------------------------------
            # outside autocast, as PyTorch's AMP recipe says: each backward op runs in the dtype its forward op
            # ran in (on CPU and CUDA alike the engine would otherwise see autocast on and recast the router's fp32 grads)
            loss.backward()
        cel, weighted = ctx.stgc.cel_values() if ctx.stgc is not None else (0.0, 0.0)   # this micro-batch's
        sums += torch.stack([out.loss.detach() * out.num_tokens, out.aux_loss.detach(),
                             torch.tensor(cel, device=device), torch.tensor(weighted, device=device)])
        if out.routing:
            counts_LE = torch.stack([r.expert_counts.float() for r in out.routing])              # [L, E]
            load_LE = counts_LE if load_LE is None else load_LE + counts_LE
        if stgc is not None and out.routing:
            totals_LT = torch.stack([c.totals(E) if c is not None else torch.zeros(4 + 2 * E, device=device)
                                     for c in stgc.conflicts])       # [L, 4 + 2E]
            stgc_LT = totals_LT if stgc_LT is None else stgc_LT + totals_LT
        if out.routing:                                                # routing measurements, real tokens only
            kinds = token_kinds(mb["input_ids"], mb["labels"], mb["attention_mask"], P)   # [B, T'] on the host
            kinds = kinds.reshape(-1).to(device, non_blocking=True) if tuple(kinds.shape) == out.routing[0].shape else None
            kind_LT = torch.stack([c.kind_totals(kinds) if c is not None and kinds is not None
                                   else torch.zeros(3 * len(KINDS), device=device)
                                   for c in (stgc.conflicts if stgc is not None else [None] * len(out.routing))])
            x_LX = torch.cat([torch.stack([layer_sums(r) for r in out.routing]),
                              torch.stack([z_L.detach(), seq_L.detach()], dim=1), kind_LT], dim=1)
            route_LX = x_LX if route_LX is None else route_LX + x_LX
    sums = all_reduce_sum(sums, ctx.world)
    lm_loss = float(sums[0] / n_global)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)   # FSDP: DTensor
    if not (math.isfinite(lm_loss) and math.isfinite(grad_norm)):   # a non-finite gradient anywhere shows here
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.nonfinite += 1
        if ctx.nonfinite >= cfg.train.max_nonfinite:
            raise RuntimeError(f"step {step}: {ctx.nonfinite} non-finite losses in a row (train.max_nonfinite); "
                               "lower the lr, check the data, or use bf16 rather than fp16")
        return {"step": step, "skipped_nonfinite": ctx.nonfinite, "lm_loss": lm_loss}
    ctx.nonfinite = 0
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    X = sums_width(E)
    if route_LX is not None:
        route_LX = all_reduce_sum(route_LX, ctx.world)                 # the whole global batch, every rank alike
        for r, row in zip(out.routing, route_LX):                      # aux-loss-free: bias from the global load
            if getattr(r.module, "expert_bias", None) is not None:
                update_expert_bias(r.module, row[2:2 + E])
    aux, cel, beta_cel = (float(x) / (accum * ctx.world) for x in sums[1:])   # means over micro-batches and ranks
    log = {"step": step, "lr": lr, "loss": lm_loss + coef.aux_loss_coef * aux + beta_cel, "lm_loss": lm_loss,
           "aux_loss": aux, "cel": cel, "grad_norm": grad_norm, "tokens": int(n_global)}
    if ctx.stgc is not None:
        log["stgc_tau"], log["stgc_beta"] = ctx.stgc.threshold, ctx.stgc.loss_weight
    # Routing statistics cover the whole step: every micro-batch, summed over ranks.
    #   expert_load  per MoE layer, each expert's share of the first choices (DeepSpeed's exp_counts)
    #   stgc         per MoE layer: pairs (kept, real, reached by the LM loss), conflict_ratio = conflicts / pairs,
    #                mean_cos over pairs, cel = the micro-batches' mean CEL, consistency = per expert the mean cos
    #                of its pairs to its mean, definition = whose gradient ('objective' fast, 'lm_loss' reference),
    #                per_kind = pairs, conflict_ratio and consistency of image / prompt-text / answer tokens; with
    #                stgc.measure also in a run without STGC (cel: what the CEL would be; nothing trains on it)
    #   routing      per MoE layer (routing.py; real tokens): entropy, load (all K choices, before capacity),
    #                load_var, utilisation, coactivation (top-2 pairs), z_loss and seq_aux_loss (the micro-batches'
    #                means, trained or not), expert_bias (aux-loss-free, after this step's update)
    #   z_loss, seq_aux_loss  their sums over layers (the objective adds coef * these)
    if route_LX is not None:
        biases = [r.module.expert_bias for r in out.routing if getattr(r.module, "expert_bias", None) is not None]
        rows = torch.cat([route_LX.flatten()] + [b.flatten() for b in biases]).tolist()   # one host sync
        width, n = route_LX.shape[1], accum * ctx.world
        bias_rows = iter([rows[len(route_LX) * width + i * E:len(route_LX) * width + (i + 1) * E] for i in range(len(biases))])
        log["routing"] = []
        for j, r in enumerate(out.routing):
            t = rows[j * width:(j + 1) * width]
            layer = {"layer": r.layer} | layer_stats(t[:X], E, K) | {"z_loss": t[X] / n, "seq_aux_loss": t[X + 1] / n}
            if getattr(r.module, "expert_bias", None) is not None:
                layer["expert_bias"] = next(bias_rows)
            log["routing"].append(layer)
        log["z_loss"] = sum(layer["z_loss"] for layer in log["routing"])
        log["seq_aux_loss"] = sum(layer["seq_aux_loss"] for layer in log["routing"])
        log["loss"] += coef.z_loss_coef * log["z_loss"] + coef.seq_aux_loss_coef * log["seq_aux_loss"]
    if load_LE is not None:
        load_LE = all_reduce_sum(load_LE, ctx.world)
        log["expert_load"] = (load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)).tolist()
    if stgc_LT is not None:
        stgc_LT = all_reduce_sum(stgc_LT, ctx.world)
        log["stgc"] = [stats_from_totals(t, E, r.layer, "objective" if stgc.cfg.impl == "fast" else "lm_loss",
                                         accum * ctx.world) for t, r in zip(stgc_LT, out.routing)]
        for layer, j in zip(log["stgc"], range(len(out.routing))):
            layer["per_kind"] = kind_stats_from_totals(rows[j * width + X + 2:(j + 1) * width], KINDS)
    return log


def router_terms(routing, coef, fn):
    """[L] fn(record) per MoE layer (moe.z_loss, moe.sequence_aux_loss), differentiable only when coef > 0: logged
    either way, trained only when asked. Empty without routing."""
    if not routing:
        return torch.zeros(0)
    with torch.set_grad_enabled(coef > 0 and torch.is_grad_enabled()):
        return torch.stack([fn(r) for r in routing])


class Stopped(Exception):
    """A run that a signal stopped before its last step, after its checkpoint was saved: train.py exits 0 (a
    preempted job is resumed, not failed); in-process callers (demo.py, bench/experiment.py) stop instead of
    evaluating a half-trained model."""


class StopRequest:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption, torchrun stopping workers before an elastic restart)
    ask the loop to stop at the next step boundary: it saves a checkpoint there and exits cleanly, so --resume auto
    continues exactly. A second signal stops at once. Ranks agree (any rank's request stops all) with one
    all-reduce of a scalar per step."""

    def __init__(self):
        self.name, self.stopping = None, False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.name = signal.Signals(signum).name

    def requested(self, world, device) -> bool:
        asked = all_reduce_sum(torch.tensor(float(self.name is not None), device=device), world)
        self.stopping = bool(asked > 0)
        return self.stopping

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def global_batches(loader, accum, stats):
    """Lists of `accum` micro-batches (one optimizer step on this rank); a partial list at the end is dropped."""
    micro = []
    for mb in loader:
        stats.update(mb)                                              # skipped / truncated records, for the report
        micro.append(mb)
        if len(micro) == accum:
            yield micro
            micro = []


@dataclass
class Run:
    """What setup() makes and restore() / loop() continue: train_step's Context and the loop's own state."""
    ctx: Context
    dataset: LlavaJsonDataset
    accum: int                         # micro-batches per optimizer step on each rank
    total_steps: int
    resume: str | None = None          # the checkpoint being continued
    load_skipped: int = 0              # records skipped when the data loaded (check_skips counts the rest)
    step: int = 0
    epoch: int = 0
    consumed: int = 0                  # samples of this epoch already drawn (all ranks)


def setup(config_paths=(), overrides=(), resume=None) -> Run:
    """The config (a resume: the checkpoint's own), the processes, every check that needs no long work, the run
    dir, the data, then the model with its trainable set, parallelism and optimizer."""
    cfg = load_config(config_paths, overrides)
    resume = resolve_resume(resume, cfg.train.out_dir) if resume else None
    if resume:                                                        # the run as it was started (run identity)
        cfg = resumed_config(resume, config_paths, overrides)
    rank, world, device = setup_distributed()
    tc = cfg.train
    if tc.global_batch_size % (tc.micro_batch_size * world):
        raise ConfigError(f"train.global_batch_size={tc.global_batch_size} is not a multiple of "
                          f"micro_batch_size={tc.micro_batch_size} x {world} ranks")
    accum = tc.global_batch_size // (tc.micro_batch_size * world)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        shown = ", ".join(config_paths) if config_paths else "defaults"
        print(f"config ({shown}{f', resuming {resume}' if resume else ''}):\n{json.dumps(asdict(cfg), indent=1)}")

    # ---- every check that needs no long work, then the run dir, then the data ---------------------
    try:
        records = read_records(cfg.data.data_path)
        tokenizer = Tokenizer.load(cfg.data.tokenizer_path, cfg.data.tokenizer_family)
    except DataError as e:
        raise ConfigError(e.detail) from None
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    check_before_work(cfg, records)
    # the MoE layers of the run, from the starting checkpoint's config alone: one MoEConfig, saved and used by all
    start = start_checkpoint(cfg, resume) or (cfg.init.llm if cfg.init.source == "hf" else "")
    cfg.moe, changes = resolve_moe(cfg, *(saved_moe_config(start) if start else (None, 0)), where=start)
    if rank == 0 and changes:
        print(f"moe: {start} has MoE layers; [moe] changes their runtime settings: {'; '.join(changes)}")
    stage = STAGES[tc.stage]
    if rank == 0 and stage.template and cfg.data.template != stage.template:
        print(f"note: train.stage={tc.stage!r} is meant for the {stage.template!r} template, data.template="
              f"{cfg.data.template!r} (STAGES)")
    ident = claim_run_dir(cfg, resume, rank)
    dataset = LlavaJsonDataset(cfg.data, tokenizer, records)
    if rank == 0:
        print(dataset.report())
        with open(os.path.join(tc.out_dir, "data_report.txt"), "w") as f:
            f.write(dataset.stats.report(max_examples=20) + "\n")
    check_skips(dataset.stats, len(dataset.stats.skipped), len(records), cfg.data.max_skip_share, tc.out_dir, rank,
                "loading the data")
    sampler = ModalityLengthGroupedSampler(dataset.modality_lengths, tc.micro_batch_size * accum, world, rank, tc.seed,
                                           group_by_modality_length=stage.grouped)
    steps_per_epoch = len(sampler) // (tc.micro_batch_size * accum)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} samples cannot fill one global batch of {tc.global_batch_size}")

    # ---- model, trainable set, parallelism, optimizer -------------------------------------------
    # a resume loads its own checkpoint's weights; cfg.init stays what the run was started from (its identity)
    raw = model = set_trainable(build_model(cfg, tokenizer.vocab_size, resume), tc).to(device)
    raw.lm.activation_checkpointing = tc.activation_checkpointing
    if world > 1 and tc.parallel == "fsdp":
        model = apply_fsdp(model, tc.dtype == "bf16" and device.type == "cuda")
    elif world > 1:
        # gradient_as_bucket_view: the grads are views into DDP's buckets, not a second fp32 copy (7.8 GiB per GPU
        # at StableLM-1.6B x 4 stage III: bench/memory_plan.py); the loop path leaves experts unused in a step
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                          find_unused_parameters=raw.lm.cfg.moe is not None
                                                          and raw.lm.cfg.moe.impl == "loop",
                                                          gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(param_groups(raw, tc), lr=tc.lr, betas=tuple(tc.adam_betas), fused=device.type == "cuda")
    start = start_checkpoint(cfg, resume)
    tower_trained = tc.train_vision_tower or (os.path.isfile(os.path.join(start, "config.json")) and tower_was_trained(start))
    extra = {"data": cfg.data.to_checkpoint(), "train_config": asdict(cfg),     # eval preprocesses as training did
             "vision_tower_trained": tower_trained,                         # export refuses to drop a trained tower
             "run": ident["run"]}                                           # keep_last prunes this run's only
    ctx = Context(cfg, model, raw, optimizer, sampler, rank, world, device, extra, tokenizer,
                  STGC(cfg.stgc) if cfg.stgc.enabled else None)
    return Run(ctx, dataset, accum, tc.max_steps or tc.epochs * steps_per_epoch, resume, len(dataset.stats.skipped))


def restore(run: Run):
    """A resume: the optimizer, the sampler's position, step, epoch and RNG of its checkpoint (the weights came
    with the model). A fresh start: the first epoch's order."""
    ctx = run.ctx
    if run.resume:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(os.path.join(run.resume, "trainer_state.pt"), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(ctx.model, ctx.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        ctx.sampler.load_state_dict(state["sampler"])
        run.step, run.epoch, ctx.nonfinite = state["step"], state["epoch"], state["nonfinite"]
        run.consumed = ctx.sampler.start
        rng = torch.load(os.path.join(run.resume, f"rng_rank{ctx.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
    else:
        ctx.sampler.set_epoch(0)
    if ctx.rank == 0:
        tc, raw = ctx.cfg.train, ctx.raw
        n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f"stage {tc.stage}: {n_train / 1e6:.2f}M of {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M "
              f"parameters train; {ctx.world} rank(s) x {tc.micro_batch_size} x {run.accum} accumulation; "
              f"{run.total_steps} steps")
        print(describe_compute(raw, ctx.device, bf16=tc.dtype == "bf16" and ctx.device.type == "cuda"))
    return run


def loop(run: Run) -> str:
    """Optimizer steps until total_steps (or a stop signal), a checkpoint every save_every and at the end; returns
    the last checkpoint's dir."""
    ctx, dataset, accum, total_steps = run.ctx, run.dataset, run.accum, run.total_steps
    cfg, tc, rank, world, raw = ctx.cfg, ctx.cfg.train, ctx.rank, ctx.world, ctx.raw
    step, epoch, consumed = run.step, run.epoch, run.consumed
    if rank == 0:
        truncate_log(os.path.join(tc.out_dir, "log.jsonl"), step)     # rows past the resumed step are redone
    log_file = open(os.path.join(tc.out_dir, "log.jsonl"), "a") if rank == 0 else None
    drawn = 0                                                          # samples drawn by this process (skip share)
    peak = peak_flops(ctx.device)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=f"{tc.stage}")
    raw.train()
    loader_collate = lambda samples: collate(samples, ctx.tokenizer.pad_id, "right", cfg.data.image_size)   # noqa: E731
    stop = StopRequest()
    try:
        while step < total_steps and not stop.stopping:
            loader = torch.utils.data.DataLoader(dataset, batch_size=tc.micro_batch_size, sampler=ctx.sampler,
                                                 collate_fn=loader_collate, num_workers=tc.num_workers, drop_last=True)
            for micro in global_batches(loader, accum, dataset.stats):
                t0 = time.perf_counter()
                log = train_step(ctx, micro, step, total_steps)
                consumed += accum * tc.micro_batch_size
                drawn += accum * tc.micro_batch_size
                step += 1
                dt = time.perf_counter() - t0
                n_images = sum(len(mb["images"]) for mb in micro) * world
                # positions the LM processes: each <image> placeholder becomes the tower's P feature positions
                n_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro) * world
                n_tokens += n_images * (raw.cfg.image_positions - 1)
                log |= {"epoch": epoch, "step_time": dt, "tokens_per_s": n_tokens / dt}
                if peak:
                    log["mfu"] = flops_per_step(raw, n_tokens, n_images) / dt / (peak * world)
                if rank == 0:
                    if step % tc.log_every == 0 or step == total_steps:
                        log_file.write(json.dumps(log) + "\n")
                        log_file.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{log['lm_loss']:.3f}", lr=f"{log.get('lr', 0):.1e}")
                check_skips(dataset.stats, len(dataset.stats.skipped) - run.load_skipped, drawn, cfg.data.max_skip_share,
                            tc.out_dir, rank, f"step {step}")        # records that fail only when read (images, length)
                if step == total_steps or stop.requested(world, ctx.device):
                    break
                if tc.save_every and step % tc.save_every == 0:
                    save_checkpoint(ctx, step, consumed, epoch)
            else:                                                         # the epoch ran out
                epoch, consumed = epoch + 1, 0
                ctx.sampler.set_epoch(epoch)
    finally:                                                          # the handlers go back even on an error
        bar.close()
        stop.restore()
    if stop.stopping:
        print(f"stopped at step {step} of {total_steps} ({stop.name}): saving a checkpoint")
    last_saved = save_checkpoint(ctx, step, consumed, epoch)
    if rank == 0:
        print(dataset.report())
        with open(os.path.join(tc.out_dir, "data_report.txt"), "w") as f:
            f.write(dataset.stats.report(max_examples=20) + "\n")
        print(f"saved {last_saved}")
        log_file.close()
    if world > 1:
        dist.destroy_process_group()
    if stop.stopping:                       # not finished: a caller (demo.py, bench/) must not go on as if it were
        raise Stopped(f"stopped at step {step} of {total_steps} ({stop.name}); {last_saved} saved: continue with --resume auto")
    return last_saved


EXPORT_USAGE = "usage: python train.py --export-moe-llava CHECKPOINT_OR_RUN_DIR --to OUT_DIR [--drop-trained-tower]"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                                         # one line, as every other mistake (__main__)
        raise ConfigError(f"{message} (python train.py --help lists the arguments)")


def parse_args(argv) -> argparse.Namespace:
    """--config (repeatable), --resume, the export flags; everything else must be --section.key=value."""
    sections = ("[train] TrainConfig, [init] InitConfig (train.py); [model], [model.vision], [model.lm] LlavaConfig, "
                "VisionConfig, LMConfig (model.py); [moe] MoEConfig (moe.py); [stgc] STGCConfig (stgc.py); [data] "
                "DataConfig (data.py)")
    item = lambda name, text: textwrap.fill(text, 112, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15)   # noqa: E731
    epilog = "\n".join([
        "overrides: --section.key=value (any number, after every --config file)",
        item("precedence", "dataclass defaults < each --config file in order < overrides"),
        item("sections", sections),
        item("values", 'TOML syntax, as in the presets: 2e-5, true, "text", [0, 2], {rope_type = "linear", factor = 2.0} '
             "(a bare word is a string), checked against the field's declared type; an unknown key, or one not "
             f"user-settable ({', '.join(NOT_SETTABLE)}), is an error naming it"),
        item("examples", "--train.lr=2e-5 --moe.capacity_factor=2.0 --stgc.enabled=true --data.image_folder=data/images"),
        item("MoE layers", f"when the starting checkpoint has them, [moe]'s runtime knobs ({', '.join(RUNTIME_FIELDS)}) "
             f"are applied and printed; a structural setting ({', '.join(STRUCTURAL_FIELDS)}) must match it"),
        item("--resume", f"takes the checkpoint's own saved config; only these may change: {', '.join(RESUMABLE)}"),
        "Stages and what trains in each: STAGES in train.py; docs/moe_llava.md §1.9."])
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0].strip(), epilog=epilog, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a TOML preset; repeat to layer overlays, later files win (--config configs/moe_llava_stablelm.toml "
                        "--config configs/stgc.toml)")
    p.add_argument("--resume", metavar="DIR|auto", help="continue a checkpoint (a run dir: its latest) exactly; 'auto': "
                   "train.out_dir's latest checkpoint if there is one, else start afresh (torchrun --max-restarts)")
    export = p.add_argument_group("export (instead of training)")
    export.add_argument("--export-moe-llava", nargs="?", const="", metavar="CHECKPOINT",
                        help="write a checkpoint (or a run dir's latest) in MoE-LLaVA / HF LLaVA layout")
    export.add_argument("--to", metavar="OUT_DIR", help="where --export-moe-llava writes")
    export.add_argument("--drop-trained-tower", action="store_true",
                        help="export even though the vision tower was trained (MoE-LLaVA's layout has no place for it)")
    args, rest = p.parse_known_args(argv)
    if args.export_moe_llava is not None:
        if not args.export_moe_llava or not args.to or rest or args.config or args.resume:
            raise ConfigError(EXPORT_USAGE)
    elif args.to or args.drop_trained_tower:
        raise ConfigError(f"--to and --drop-trained-tower go with --export-moe-llava; {EXPORT_USAGE}")
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(f"arguments must be --config FILE, --resume DIR or --section.key=value; got {bad}")
    args.overrides = rest
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.export_moe_llava is not None:
        return export_moe_llava(args.export_moe_llava, args.to, drop_trained_tower=args.drop_trained_tower)
    return loop(restore(setup(args.config, args.overrides, args.resume)))

# -----------------------------------------------------------------------------
# Export to MoE-LLaVA / HF layout


def export_moe_llava(checkpoint, out_dir, drop_trained_tower=False):
    """Our checkpoint (or run dir: its latest step) -> a dir LLaVA/MoE-LLaVA tools read: their key names
    (to_hf_state_dict), a config.json with the LLM's HF fields, the mm_* fields and (for MoE) the `moe` dict. The
    vision tower is left out: MoE-LLaVA loads it from its own dir. So a checkpoint whose tower was trained here
    (in its run or an earlier stage it started from) is refused unless drop_trained_tower says to lose it.
    LoRA/MoLE weights have no such layout."""
    from safetensors.torch import save_file
    checkpoint = latest_checkpoint(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise FileNotFoundError(f"--export-moe-llava {checkpoint}: no config.json there (expected a step_* dir or a run dir)")
    if tower_was_trained(checkpoint) and not drop_trained_tower:
        raise ConfigError(f"{checkpoint}: its vision tower was trained (train.train_vision_tower), and MoE-LLaVA's layout "
                          "has no place for it; keep using our checkpoint, or pass --drop-trained-tower to export without it")
    model = LlavaModel.from_pretrained(checkpoint)
    if any(name.endswith("expert_bias") for name, _ in model.named_buffers()):
        raise ConfigError(f"{checkpoint}: its routers choose experts with an aux-loss-free bias (moe.expert_bias), which "
                          "MoE-LLaVA's layout and code do not have: exported, it would route differently; keep our checkpoint")
    lm = model.lm.cfg
    family = lm.family if lm.family != "llama" or not (lm.qkv_bias and not lm.o_bias) else "qwen1_5"   # Qwen2 biases
    hf = {"model_type": ("moe_llava_" if lm.moe else "llava_") + family, "vocab_size": lm.vocab_size,
          "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size * (2 if family == "qwen" else 1),
          "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads, "num_key_value_heads": lm.num_kv_heads,
          "head_dim": lm.head_dim, "kv_channels": lm.head_dim, "rope_theta": lm.rope_theta, "rotary_emb_base": lm.rope_theta,
          "partial_rotary_factor": lm.partial_rotary_factor, "rotary_pct": lm.partial_rotary_factor,
          "rms_norm_eps": lm.norm_eps, "layer_norm_eps": lm.norm_eps, "layer_norm_epsilon": lm.norm_eps,
          "use_qkv_bias": lm.qkv_bias, "attention_bias": lm.qkv_bias and lm.o_bias, "mlp_bias": lm.mlp_bias,
          "use_parallel_residual": lm.parallel_block, "tie_word_embeddings": lm.tie_embeddings,
          "hidden_act": lm.act, "max_position_embeddings": lm.max_position_embeddings, "seq_length": lm.max_position_embeddings,
          "mm_hidden_size": model.cfg.vision.hidden_size, "mm_vision_select_layer": model.cfg.vision.select_layer,
          "mm_vision_select_feature": model.cfg.vision.select_feature, "image_projector_type": model.cfg.projector}
    if lm.moe is not None:
        if lm.moe.kind != "ffn":
            raise ValueError("MoLE / LoRA checkpoints have no MoE-LLaVA layout")
        layers = lm.moe.layer_indices(lm.num_layers)
        hf["moe"] = {"moe_enable": True, "moe_mode": "custom", "moe_layers_idx": layers, "ep_size": 1,
                     "top_k_experts": lm.moe.top_k, "capacity_factor": lm.moe.capacity_factor,
                     "eval_capacity_factor": lm.moe.eval_capacity_factor, "min_capacity": lm.moe.min_capacity,
                     "use_residual": False, "router_aux_loss_coef": lm.moe.aux_loss_coef,
                     "num_experts": [lm.moe.num_experts] * len(layers)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(model).items()}, os.path.join(out_dir, "model.safetensors"))
    if os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        shutil.copy(os.path.join(checkpoint, "tokenizer.json"), out_dir)
    print(f"exported {checkpoint} -> {out_dir} ({hf['model_type']})")
    return out_dir


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:                             # a mistake in the command or data: one line
        sys.exit(f"error: {e}")
    except Stopped as e:                                              # SIGINT / SIGTERM: saved, resumable, exit 0
        print(e)
