"""
eval.py: run a checkpoint over the benchmarks of MoE-LLaVA / LLaVA-MoLE / STGC, write the official answer and
submission files, score what can be scored locally, and analyse the routing (expert loading per benchmark;
the token-gradient conflicts of a checkpoint trained with STGC).

    python eval.py --checkpoint out/demo/stage3 --benchmark all --data out/synthetic/eval
    python eval.py --checkpoint ckpt/MoE-LLaVA-StableLM-1.6B-4e --vision-tower ckpt/clip-vit-large-patch14-336 \\
                   --benchmark gqa,pope,textvqa --data playground/data/eval --batch-size 32
    torchrun --nproc_per_node=8 eval.py --checkpoint ... --benchmark vqav2      # contiguous shards, rank 0 merges
    python eval.py --checkpoint out/demo/stage3 --image scene.png --question "What colour is the circle?"
                                                 # one question, the greedy answer printed (also HF LLaVA dirs)

What each benchmark reads, writes and computes, and which official script each metric reproduces, is in
benchmarks.py (docs/moe_llava.md §5; bare § numbers in this file cite it). This file is the runner:
  1. config      EvalConfig; our checkpoints (config.json "format": "moe-vlm" with a "data" dict) or HF LLaVA /
                 MoE-LLaVA dirs (template and preprocessing from their config, the tower from --vision-tower)
  2. prompts     template.render([user turn]) -> "... USER: <image>\\n{question} ASSISTANT:" (§5.1); images
                 padded to square (model_vqa_loader, mmbench) or not (model_vqa, science), per benchmark
  3. generation  batched greedy decoding with the KV cache and left padding (model.generate), stop at eos /
                 the template's end-of-turn, max_new_tokens per benchmark (128 short answers, 1024 long)
  4. answers     append-only JSONL per rank ({world}_{rank}.jsonl: question_id, prompt, text, answer_id,
                 model_id, metadata, as MoE-LLaVA writes them); a rerun skips every answered question if the
                 folder's fingerprint.json (weights, tokenizer, question file, answer-changing settings) is
                 this run's, else the old answers move to previous/<fingerprint>/; rank 0 merges the shards in
                 question order into merge.jsonl and scores it
  5. analysis    expert loading per benchmark and MoE layer (image / text / generated tokens), JSON (+ PNG
                 when matplotlib imports); conflict statistics (stgc.find_conflicts) on a labelled split
Outputs under --out (default <checkpoint>/eval): answers/<benchmark>/<model_id>/merge.jsonl, upload/...
(official submission files), results.json, analysis/expert_loading.json, analysis/conflicts.json.

Deliberate deviations from MoE-LLaVA's evaluation (benchmarks.py lists the metric-side ones):
  * Batched generation (left padding) instead of batch size 1; equal results (tests/test_model.py).
  * Deterministic routing at evaluation: the original Gumbel-samples the second expert even in eval, so its
    scores vary run to run (§1.6, issue #60); ours are identical across runs (tested).
  * answer_id is a hash of (model_id, question), shortuuid-shaped, not a random shortuuid, so two runs write
    identical files.
  * Precision: fp32 on CPU, bf16 on CUDA (--dtype); the original runs fp16 under deepspeed.init_inference.
"""
import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from benchmarks import BENCHMARKS, DataFileError, Question, read_json, record_key
from data import (IMAGE_PLACEHOLDER, TEMPLATES, DataConfig, LlavaJsonDataset, Tokenizer, check_template, collate, file_sha256,
                  load_image, process_image)
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaModel, latest_checkpoint, setup_distributed
from moe import check_choice, is_routed
from stgc import STGCConfig, find_conflicts
from routing import (layer_stats, layer_sums, pathway_counts, purity_nmi, router_entropy, sums_of, sums_width,
                     top_pathways)

# -----------------------------------------------------------------------------
# 1. Config and model


@dataclass
class EvalConfig:
    checkpoint: str = ""
    benchmark: str = "all"             # a name, a comma-separated list, or 'all' (every one whose question file exists)
    data: str = "playground/data/eval"  # LLaVA-1.5's eval.zip layout (benchmarks.py names every file)
    vision_tower: str = ""             # HF LLaVA / MoE-LLaVA checkpoints: the tower's local dir
    out: str = ""                      # default <checkpoint>/eval
    batch_size: int = 8
    max_samples: int = 0               # 0: all; N: the first N questions of each benchmark (smoke runs)
    max_new_tokens: int = 0            # 0: each benchmark's own (§5.1)
    model_id: str = ""                 # default: the checkpoint dir's name ('model_id' of the answer files)
    image_folder: str = ""             # replaces every benchmark's image dir
    questions: dict = field(default_factory=dict)     # benchmark -> a question file replacing the official one
    annotations: dict = field(default_factory=dict)   # benchmark -> annotation file (a dir for pope and mme)
    template: str = ""                 # conversation template (default: the checkpoint's, or from its model_type)
    tokenizer: str = ""                # a tokenizer file or dir (default: the checkpoint dir), read as train.py does
    device: str = "auto"               # auto: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    dtype: str = "auto"                # auto: bfloat16 on CUDA, float32 on CPU
    workers: int = 0                   # DataLoader workers decoding and preprocessing images
    expert_loading: bool = True        # count the experts' tokens per benchmark and MoE layer while generating
    conflicts: str = ""                # a labelled LLaVA JSON: STGC conflict statistics of the checkpoint
    conflict_samples: int = 64         # how many of its records
    # LLaVA-MoLE's evaluation wrapper (docs/llava_mole.md §2), off unless set: a prefix to every question, and HF's
    # repetition penalty on the generated tokens (10.0 there; 1.0 = none)
    question_prefix: str = ""
    repetition_penalty: float = 1.0
    # single-question mode (ask): one user turn, its greedy answer printed; no benchmark runs
    image: str = ""                    # an image file ('' = a text-only question)
    question: str = ""

    def __post_init__(self):
        if not self.checkpoint:
            raise ValueError("--checkpoint is required")
        if self.image and not self.question:
            raise ValueError("--image needs --question (single-question mode)")
        if self.image and not os.path.isfile(self.image):
            raise ValueError(f"--image {self.image}: no such file")
        check_choice("--dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition-penalty={self.repetition_penalty} must be > 0 (1.0: none)")
        if self.template:                                              # '' = the checkpoint's own
            check_choice("--template", self.template, TEMPLATES)
        names = list(BENCHMARKS) if self.benchmark == "all" else [b.strip() for b in self.benchmark.split(",")]
        unknown = [n for n in names + list(self.questions) + list(self.annotations) if n not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)} (or 'all')")
        self.benchmarks = names
        if self.conflicts and not os.path.isfile(self.conflicts):      # before any generation, not after it
            raise ValueError(f"--conflicts {self.conflicts!r} not found (a labelled LLaVA JSON for conflict statistics)")
        self.model_id = self.model_id or os.path.basename(os.path.normpath(self.checkpoint))
        self.checkpoint = latest_checkpoint(self.checkpoint)   # a train.py run dir means its latest step
        self.out = self.out or os.path.join(self.checkpoint, "eval")


def load_model(cfg: EvalConfig, device):
    """(model, tokenizer, DataConfig, template). Our checkpoints carry their preprocessing in config.json
    ["data"]; for HF LLaVA / MoE-LLaVA dirs it follows MoE-LLaVA's conventions (§3.2, §3.3, §3.6)."""
    config = read_json(os.path.join(cfg.checkpoint, "config.json"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    model = LlavaModel.from_pretrained(cfg.checkpoint, vision_tower=cfg.vision_tower or None, dtype=dtype)
    model = model.to(device).eval()
    data_cfg = checkpoint_data_config(config, model.cfg.vision)
    if cfg.template:
        data_cfg = replace(data_cfg, template=cfg.template)
    tok = Tokenizer.load(cfg.tokenizer or cfg.checkpoint, data_cfg.tokenizer_family)      # train.py's loader
    template = TEMPLATES[data_cfg.template]
    check_template(tok, template)
    return model, tok, data_cfg, template


def checkpoint_data_config(config: dict, vision) -> DataConfig:
    """Ours: the "data" dict train.py saves (DataConfig.to_checkpoint); fields a checkpoint saved before they
    existed keep their defaults, with a warning. HF LLaVA / MoE-LLaVA: the template and tokenizer family of
    the LLM (phi / stablelm / qwen, MoE-LLaVA's conv modes; vicuna_v1 for LLaVA-1.5), the tower's processor and
    size, and image_aspect_ratio (MoE-LLaVA sets 'pad')."""
    if config.get("format") == "moe-vlm":
        data_cfg, missing = DataConfig.from_checkpoint(config.get("data", {}))
        if missing:
            print(f"warning: the checkpoint's data config has no {', '.join(missing)}; using the defaults "
                  f"({', '.join(f'{k}={getattr(data_cfg, k)!r}' for k in missing)})", file=sys.stderr)
        return data_cfg
    model_type = config.get("model_type", "")
    family = next((f for f in ("phi", "stablelm", "qwen") if f in model_type), "llama")
    aspect = config.get("image_aspect_ratio", "pad")
    return DataConfig(template={"llama": "vicuna_v1"}.get(family, family), tokenizer_family=family,
                      image_processor=vision.kind, image_size=vision.image_size,
                      image_aspect=aspect if aspect in ("pad", "square") else "pad")


def stop_ids(tok: Tokenizer, template) -> list[int]:
    """eos, and the template's end-of-turn when it is one token (KeywordsStoppingCriteria on sep2, §5.1)."""
    ids = {tok.eos_id}
    sep2 = tok.encode(template.sep2) if template.sep2 else []
    if len(sep2) == 1:
        ids.add(sep2[0])
    return sorted(ids)

# -----------------------------------------------------------------------------
# 2. Benchmarks: questions, images, prompts


def synthetic_image_folder(path: str) -> str | None:
    """The image folder of the synthetic dataset `path` (its eval dir or one of its JSON files) sits in: the
    dataset's meta.json, next to both, names it; its files give image paths relative to it."""
    parent = os.path.dirname(os.path.abspath(path))
    meta = os.path.join(parent, "meta.json")
    folder = read_json(meta).get("image_folder") if os.path.isfile(meta) else None
    return os.path.join(parent, folder) if folder else None


def image_root(cfg: EvalConfig, bench, qfile: str) -> str:
    """--image-folder; else the synthetic dataset's image folder; else the benchmark's official image dir."""
    official = os.path.join(cfg.data, bench.image_dir) if bench.image_dir else os.path.dirname(qfile)
    return cfg.image_folder or synthetic_image_folder(cfg.data) or official


def question_file(cfg: EvalConfig, name: str) -> str:
    return cfg.questions.get(name) or os.path.join(cfg.data, BENCHMARKS[name].question_file)


def selected(cfg: EvalConfig) -> list[str]:
    """The benchmarks to run. 'all' skips (and names) those whose question file is absent; a benchmark
    asked for by name must have it."""
    if cfg.benchmark != "all":
        return cfg.benchmarks
    present = [n for n in cfg.benchmarks if os.path.isfile(question_file(cfg, n))]
    if not present:
        raise DataFileError(f"{cfg.data}: no benchmark question file found (e.g. {question_file(cfg, 'gqa')})")
    absent = [n for n in cfg.benchmarks if n not in present]
    if absent:
        print(f"eval: no question file under {cfg.data} for {', '.join(absent)}: skipped")
    return present


def load_benchmark(cfg: EvalConfig, name: str):
    """Questions (after --max-samples) and what scoring needs; every file checked before any generation."""
    bench, qfile = BENCHMARKS[name], question_file(cfg, name)
    if not os.path.isfile(qfile):
        raise DataFileError(f"{name}: question file {qfile} not found (expected {bench.question_file} under --data, "
                            f"or --questions {name}=FILE)")
    questions, gold = bench.load(qfile, cfg.data, cfg.annotations.get(name), image_root(cfg, bench, qfile))
    if cfg.max_samples:
        questions = questions[:cfg.max_samples]
    dup = next((k for k, n in Counter(q.key for q in questions).items() if n > 1), None)
    if dup is not None:
        raise DataFileError(f"{qfile}: question {dup.split(chr(31))[0]!r} appears twice with the same prompt")
    missing = [q.image for q in questions if isinstance(q.image, str) and not os.path.isfile(q.image)]
    if missing:
        raise DataFileError(f"{name}: {len(missing)} of {len(questions)} images not found, e.g. {missing[:3]} "
                            "(--image-folder sets the image dir)")
    return questions, gold


class PromptSet(torch.utils.data.Dataset):
    """Token ids of each rendered prompt and its preprocessed image (None for a text-only question)."""

    def __init__(self, questions, tok, template, data_cfg, question_prefix=""):
        self.questions, self.tok, self.template, self.data_cfg = questions, tok, template, data_cfg
        self.prefix = question_prefix

    def __len__(self):
        return len(self.questions)

    def __getitem__(self, i):
        q = self.questions[i]
        user = q.user
        if self.prefix:                          # LLaVA-MoLE prefixes the question, then puts "<image>\n" before it
            image = IMAGE_PLACEHOLDER + "\n" if user.startswith(IMAGE_PLACEHOLDER + "\n") else ""
            user = image + self.prefix + user[len(image):]
        ids = self.tok.tokenize_with_images(self.template.render([user]), bos=self.template.bos)   # "... ASSISTANT:" (§5.1)
        image = None
        if q.image is not None:
            img = Image.open(io.BytesIO(q.image)) if isinstance(q.image, bytes) else load_image(q.image)
            image = process_image(img, self.data_cfg)                          # [3, S, S]
        return i, ids, image

# -----------------------------------------------------------------------------
# 3. Generation and answer files

SHORTUUID = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"   # shortuuid's 57 characters


def answer_id(model_id: str, key: str) -> str:
    """Shaped like the original's shortuuid (22 characters) but a hash, so reruns write identical files."""
    n = int.from_bytes(hashlib.sha256(f"{model_id}\x1f{key}".encode()).digest()[:16], "big")
    out = []
    for _ in range(22):
        n, r = divmod(n, 57)
        out.append(SHORTUUID[r])
    return "".join(out)


def generate_answers(model, tok, template, data_cfg, bench, questions, cfg: EvalConfig, path, loading=None,
                     show=True):
    """Append one answer line per question to `path`, a batch at a time (flushed, so an interrupted run
    loses at most the batch in flight)."""
    if not questions:
        return
    # model_vqa.py / model_vqa_science.py call the image processor directly: no pad to square (§5.1)
    dcfg = data_cfg if bench.pad_images else replace(data_cfg, image_aspect="square")
    loader = torch.utils.data.DataLoader(PromptSet(questions, tok, template, dcfg, cfg.question_prefix), batch_size=cfg.batch_size,
                                         num_workers=cfg.workers, collate_fn=list)
    eos, max_new = stop_ids(tok, template), cfg.max_new_tokens or bench.max_new_tokens
    with open(path, "a", encoding="utf-8") as f:
        for batch in tqdm(loader, desc=bench.name, unit="batch", disable=not show):
            index, ids, images = zip(*batch)
            pixels = [x for x in images if x is not None]
            pixels = torch.stack(pixels) if pixels else None                  # [N, 3, S, S], placeholder order
            if loading is not None:
                loading.begin(ids)
            new = model.generate(list(ids), pixels, max_new_tokens=max_new, eos_token_id=eos,
                                 repetition_penalty=cfg.repetition_penalty)
            if loading is not None:
                loading.end(new)
            for i, tokens in zip(index, new):
                q = questions[i]
                text = tok.decode(tokens).strip()                               # skip_special_tokens, strip (§5.1)
                if bench.stop_strip and template.sep2:
                    text = text.removesuffix(template.sep2).strip()
                rec = {"question_id": q.question_id, "prompt": q.prompt, "text": text, **q.extra,
                       "answer_id": answer_id(cfg.model_id, q.key), "model_id": cfg.model_id, "metadata": {}}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()


def read_answers(folder: str) -> dict:
    """Every answer already written under folder (all shard files and merge.jsonl), by question key. A last
    line without its newline is a write cut short (a crash, or another rank writing now) and is ignored; any
    other bad line is an error naming it."""
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                found.setdefault(record_key(rec), rec)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if n == len(lines):                                            # no newline after it: partial
                    continue
                raise DataFileError(f"{path}:{n}: not an answer record ({e}); delete the line to regenerate it") from None
    return found


def repair_tail(path: str):
    """Cut a partial last line (a crash mid-write) so that appending starts on a fresh line."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def merge_answers(folder: str, questions) -> list[dict]:
    """merge.jsonl: one answer per question, in question-file order (written atomically)."""
    found = read_answers(folder)
    merged = [found[q.key] for q in questions if q.key in found]
    path = os.path.join(folder, "merge.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in merged)
    os.replace(path + ".tmp", path)
    return merged


def shard(items: list, rank: int, world: int) -> list:
    """LLaVA's get_chunk: contiguous chunks of ceil(n / world) questions, chunk r for rank r."""
    size = math.ceil(len(items) / world) if items else 0
    return items[rank * size:(rank + 1) * size]

# -----------------------------------------------------------------------------
# 3b. Which checkpoint an answer folder holds
# The answers of a folder are reused only for the checkpoint and settings that wrote them: fingerprint.json
# beside them records a hash of every file that changes an answer (weights, config.json, tokenizer, the
# tower's weights, the question file) and every eval setting that does (max_new_tokens, template, dtype,
# device type). batch_size, workers and sharding do not (batched equals one at a time, tested). Images are
# identified by their paths in the question file, not by their content (hashing a benchmark's images would
# cost minutes per run).

FINGERPRINT = "fingerprint.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer_config.json", "special_tokens_map.json")


def weight_files(folder: str) -> list[str]:
    """The files model.load_checkpoint reads, resolved in its order (sharded safetensors, model.safetensors,
    sharded .bin, pytorch_model.bin), and the index that names the shards."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(folder, index)):
            return [index] + sorted(set(read_json(os.path.join(folder, index))["weight_map"].values()))
        if os.path.isfile(os.path.join(folder, single)):
            return [single]
    return []


def checkpoint_files(cfg: EvalConfig) -> dict:
    """{name: sha256} of what the model and tokenizer are read from, computed once per run: 0.01 s for the
    demo's 9 MB checkpoint, 2 s per GiB on a shared 2-core Xeon (page-cached; sha256 there runs at 0.8 GiB/s),
    so ~7 s for a 1.6B-parameter fp16 checkpoint, per rank, next to minutes of generation."""
    files = {"config.json": os.path.join(cfg.checkpoint, "config.json")}
    files |= {w: os.path.join(cfg.checkpoint, w) for w in weight_files(cfg.checkpoint)}
    tok = cfg.tokenizer or cfg.checkpoint
    if os.path.isdir(tok):
        files |= {f"tokenizer/{n}": os.path.join(tok, n) for n in sorted(os.listdir(tok))
                  if n in TOKENIZER_FILES or n.endswith(".tiktoken")}
    else:
        files["tokenizer/" + os.path.basename(tok)] = tok
    if cfg.vision_tower:
        files |= {f"vision_tower/{w}": os.path.join(cfg.vision_tower, w)
                  for w in ["config.json"] + weight_files(cfg.vision_tower)}
    return {name: file_sha256(path) for name, path in files.items() if os.path.isfile(path)}


def answer_fingerprint(cfg: EvalConfig, name: str, files: dict, device) -> dict:
    """What defines one benchmark's answers, and its short hash (the name the printed lines use)."""
    settings = {"benchmark": name, "question_file": file_sha256(question_file(cfg, name)),
                "max_new_tokens": cfg.max_new_tokens or BENCHMARKS[name].max_new_tokens,
                "template": cfg.template or "(checkpoint's)", "device_type": device.type,
                "question_prefix": cfg.question_prefix, "repetition_penalty": cfg.repetition_penalty,
                "dtype": ("bfloat16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype}
    blob = json.dumps({"files": files, "settings": settings}, sort_keys=True).encode()
    return {"fingerprint": hashlib.sha256(blob).hexdigest()[:12], "files": files, "settings": settings}


def what_differs(old: dict, new: dict) -> str:
    files = sorted(k for k in old.get("files", {}).keys() | new["files"].keys()
                   if old.get("files", {}).get(k) != new["files"].get(k))
    settings = [f"{k} {old.get('settings', {}).get(k)!r} -> {v!r}" for k, v in new["settings"].items()
                if old.get("settings", {}).get(k) != v]
    return "; ".join(([f"files {', '.join(files)}"] if files else []) + settings) or "its fingerprint"


def claim_answer_folder(folder: str, fp: dict, rank: int):
    """Make `folder` hold answers of `fp` only. Answers of another fingerprint move to previous/<theirs>/
    (kept, not reused) and the folder starts empty. Answers without a fingerprint file (written by hand, or by
    eval.py before fingerprints) are reused with a warning and adopted. Rank 0 decides, before the other ranks
    read the folder (run() puts a barrier between)."""
    path = os.path.join(folder, FINGERPRINT)
    old = read_json(path) if os.path.isfile(path) else None
    if old is not None and old.get("fingerprint") == fp["fingerprint"]:
        return
    answers = [n for n in sorted(os.listdir(folder)) if n.endswith(".jsonl")]
    if old is not None:
        if rank != 0:
            raise DataFileError(f"{folder}: holds answers of checkpoint {old.get('fingerprint')}, not of "
                                f"{fp['fingerprint']}; rank 0 moves them aside, run all ranks together")
        keep = os.path.join(folder, "previous", str(old.get("fingerprint")))
        if os.path.isdir(keep):
            shutil.rmtree(keep)                            # answers of that same fingerprint: the same answers
        os.makedirs(keep)
        for n in answers + [FINGERPRINT]:
            os.replace(os.path.join(folder, n), os.path.join(keep, n))
        print(f"eval: {folder}: {len(answers)} answer files of checkpoint {old.get('fingerprint')} differ in "
              f"{what_differs(old, fp)}: not reused, moved to {keep}")
    elif answers:
        print(f"eval: {folder}: answer files without {FINGERPRINT} (written by hand or by an older eval.py): "
              f"reused as answers of checkpoint {fp['fingerprint']}; delete them to answer anew")
    with open(path + f".tmp{rank}", "w") as f:
        json.dump(fp, f, indent=1)
    os.replace(path + f".tmp{rank}", path)

# -----------------------------------------------------------------------------
# 4. Analysis: expert loading and token-gradient conflicts

KINDS = ("image", "text", "answer")   # prompt image features, prompt text tokens, generated (or supervised) tokens


def moe_layers(model):
    """(decoder layer index, module) of every routed MoE / MoLE layer."""
    return [(i, b.mlp) for i, b in enumerate(model.lm.layers) if is_routed(b.mlp)]


def prompt_kinds(ids, num_features: int, labels=None) -> list[int]:
    """Kind of each position after splicing: an image placeholder becomes num_features image positions;
    with labels, supervised text tokens are 'answer'."""
    kinds = []
    for t, i in enumerate(ids):
        if i == IMAGE_TOKEN_INDEX:
            kinds += [0] * num_features
        else:
            kinds.append(2 if labels is not None and labels[t] != IGNORE_INDEX else 1)
    return kinds


class ExpertLoading:
    """Tokens routed to each expert, per MoE layer and token kind, while generate() runs: the papers' expert
    loading figure. Forward hooks on the MoE layers collect each call's routing record: the first call of a
    batch is the left-padded prefill, each later call one decoding step, whose token counts while it belongs
    to the answer (before eos). 'all' counts every kept (token, expert) assignment, 'top1' first choices.
    Also (routing.py, over the tokens of every kind): the router's entropy, load variance and utilisation, the
    co-activation of top-2 pairs, and the activated pathways (each token's first choices across the MoE layers,
    STGC paper Fig. 5) per kind."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        self.P = model.cfg.image_positions                             # features (+ MoLE's start / end tokens)
        self.E = model.cfg.lm.moe.num_experts if self.layers else 0
        self.K = model.cfg.lm.moe.top_k if self.layers else 0
        self.records = None
        self.hooks = [m.register_forward_hook(self._hook) for _, m in self.layers]
        self.reset()

    def reset(self):
        device = next(iter(self.layers[0][1].parameters())).device if self.layers else "cpu"
        self.all = torch.zeros(len(self.layers), len(KINDS), max(self.E, 1), device=device)
        self.top1 = torch.zeros_like(self.all)
        self.sums = torch.zeros(len(self.layers), sums_width(max(self.E, 1)), device=device)   # routing.sums_of
        self.paths = {k: Counter() for k in KINDS}

    def _hook(self, module, inputs, output):
        if self.records is not None:                                   # a routed layer's output: (y, RoutingRecord)
            rec = output[1]
            self.records.append((rec.experts.detach(), rec.kept.detach(), rec.shape, router_entropy(rec.router_logits)))

    def begin(self, ids_batch):
        kinds = [prompt_kinds(ids, self.P) for ids in ids_batch]
        T = max(len(k) for k in kinds)
        self.prefill = torch.tensor([[-1] * (T - len(k)) + k for k in kinds])   # [B, T], left padding = -1
        self.records = []

    def end(self, new_tokens):
        L, records, self.records = len(self.layers), self.records, None
        if not L:
            return
        lengths = torch.tensor([len(t) for t in new_tokens])
        first = []                                                     # this call's first choices, layer by layer
        for c, (experts_SK, kept_SK, (B, T), entropy_S) in enumerate(records):
            call = c // L
            if call == 0:
                assert T == self.prefill.shape[1], "the first call of generate() is the prefill"
                kinds = self.prefill.reshape(-1)
            else:   # decoding call c processes generated token c - 1: part of the answer if before eos
                kinds = torch.where(call - 1 < lengths, 2, -1)
            kinds = kinds.to(experts_SK.device)
            onehot_SKE = F.one_hot(experts_SK, self.E).float() * kept_SK[..., None]
            for k in range(len(KINDS)):
                m = kinds == k
                self.all[c % L, k] += onehot_SKE[m].sum(dim=(0, 1))
                self.top1[c % L, k] += onehot_SKE[m][:, 0].sum(dim=0)
            self.sums[c % L] += sums_of(entropy_S, experts_SK, kinds >= 0, self.E)
            first.append(experts_SK[:, 0])
            if c % L == L - 1:                                         # the call's last MoE layer: its pathways
                first_SL = torch.stack(first, dim=1)                   # [S, L]
                for k, kind in enumerate(KINDS):
                    self.paths[kind].update(pathway_counts(first_SL, kinds == k))
                first = []

    def summary(self, questions: int) -> dict:
        """Fractions per layer and kind; under torchrun the counts (and `questions`, this rank's number of
        generated questions) are summed over the ranks first."""
        questions = torch.tensor(float(questions), device=self.all.device)
        paths = self.paths
        if dist.is_available() and dist.is_initialized():
            for t in (self.all, self.top1, self.sums, questions):
                dist.all_reduce(t)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.paths)
            paths = {k: sum((g[k] for g in gathered), Counter()) for k in KINDS}

        def fractions(counts):                                                  # [L, E] -> per layer, sums to 1
            return [(row / row.sum()).tolist() if row.sum() > 0 else [0.0] * self.E for row in counts.double().cpu()]

        out = {"layers": [i for i, _ in self.layers], "num_experts": self.E, "top_k": self.K, "questions": int(questions),
               "tokens": {k: int(self.top1[0, n].sum()) for n, k in enumerate(KINDS)}}
        for name, counts in (("all", self.all), ("top1", self.top1)):
            out[name] = {k: fractions(counts[:, n]) for n, k in enumerate(KINDS)} | {"total": fractions(counts.sum(1))}
        # routing.py's measures per layer (all kinds), first-choice counts (purity / NMI across benchmarks), pathways
        out["routing"] = [{"layer": i} | layer_stats(row, self.E, self.K) for (i, _), row in zip(self.layers, self.sums.tolist())]
        out["top1_counts"] = self.top1.sum(1).tolist()                                  # [L][E]
        total = sum(paths.values(), Counter())
        out["pathways"] = {k: top_pathways(c) for k, c in paths.items()} | {"total": top_pathways(total)}
        out["distinct_pathways"] = {k: len(c) for k, c in paths.items()} | {"total": len(total)}
        return out


def plot_expert_loading(analysis: dict, path: str):
    """Stacked bars, one per MoE layer, of the fraction of tokens each expert takes; a row per benchmark and
    a column per token kind. Skipped (None) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = ("total",) + KINDS
    fig, axes = plt.subplots(len(analysis), len(kinds), figsize=(3 * len(kinds), 2.2 * len(analysis)), squeeze=False)
    for r, (name, a) in enumerate(analysis.items()):
        x = range(len(a["layers"]))
        for c, kind in enumerate(kinds):
            ax, bottom = axes[r][c], [0.0] * len(a["layers"])
            for e in range(a["num_experts"]):
                values = [layer[e] for layer in a["all"][kind]]
                ax.bar(x, values, bottom=bottom, label=f"expert {e}")
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.set_xticks(list(x), [str(i) for i in a["layers"]], fontsize=6)
            ax.set_ylim(0, 1)
            ax.set_title(f"{name}: {kind} ({a['tokens'].get(kind, sum(a['tokens'].values()))} tokens)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("MoE layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pathways(a: dict, name: str, path: str, top=8):
    """The activated-pathway picture (STGC paper Fig. 5) of one benchmark: x the MoE layers, y the first-choice
    expert, one line per frequent pathway, its width and the legend its share of the tokens. Skipped (None) when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(a["layers"]), 3.2))
    for rank, (p, n, share) in enumerate(a["pathways"]["total"][:top]):
        jitter = (rank - top / 2) * 0.02                               # overlapping segments stay apart
        ax.plot(range(len(p)), [e + jitter for e in p], marker="o", linewidth=1 + 12 * share, alpha=0.7,
                label=f"{'-'.join(map(str, p))}: {share:.1%}")
    ax.set_xticks(range(len(a["layers"])), [str(i) for i in a["layers"]], fontsize=7)
    ax.set_yticks(range(a["num_experts"]))
    ax.set_xlabel("MoE layer", fontsize=8)
    ax.set_ylabel("first-choice expert", fontsize=8)
    ax.set_title(f"{name}: top pathways ({a['distinct_pathways']['total']} distinct)", fontsize=8)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def specialisation(analysis: dict) -> dict:
    """Expert-benchmark purity and NMI per MoE layer (routing.purity_nmi) from each benchmark's first-choice counts,
    the benchmark as the domain label; {} with fewer than two benchmarks."""
    named = {n: a for n, a in analysis.items() if a.get("top1_counts")}
    if len(named) < 2:
        return {}
    layers = next(iter(named.values()))["layers"]
    out = {"benchmarks": list(named), "layers": []}
    for j, layer in enumerate(layers):
        out["layers"].append({"layer": layer} | purity_nmi([a["top1_counts"][j] for a in named.values()]))
    return out


def checkpoint_stgc_config(config: dict) -> STGCConfig:
    """The STGC settings the checkpoint was trained with (config.json's train_config["stgc"]), which define its
    conflicts: gradient source and tau (at the end of a scheduled run, where the checkpoint is). Checkpoints
    without them (HF LLaVA / MoE-LLaVA dirs, runs without STGC keep theirs too) get the paper's defaults. The expert
    mean is this process's ('rank'): rank 0 alone computes the statistics."""
    saved = config.get("train_config", {}).get("stgc") or {}
    known = {f.name for f in fields(STGCConfig)}
    stgc = STGCConfig(**{k: v for k, v in saved.items() if k in known})
    tau = stgc.threshold_final if stgc.threshold_schedule != "constant" else stgc.threshold
    return replace(stgc, threshold=tau, threshold_schedule="constant", mean_scope="rank")


def conflict_statistics(model, tok, data_cfg, cfg: EvalConfig, device, stgc_cfg: STGCConfig | None = None) -> dict:
    """Token-gradient conflicts (stgc.find_conflicts with the checkpoint's own STGC settings: checkpoint_stgc_config;
    the paper's defaults, bias gradients and tau = 0, where it has none) of this
    checkpoint on a labelled LLaVA JSON: the gradient of the LM loss at each MoE layer's output, then per
    layer the share of (token, expert) pairs whose gradient points against their expert's mean, overall,
    per expert and per token kind (with the kind's gradient consistency, its mean cos). Routing is the evaluation
    routing (eval capacity, no Gumbel), which is where a trained checkpoint's conflicts are of interest; training
    computes them under training routing. Also per layer routing.py's measures over the split's real tokens and,
    where its records carry a "domain" (the synthetic set does), expert-domain purity and NMI of first choices."""
    if stgc_cfg is None:
        stgc_cfg = checkpoint_stgc_config(read_json(os.path.join(cfg.checkpoint, "config.json")))
    folder = cfg.image_folder or synthetic_image_folder(cfg.conflicts) or os.path.dirname(os.path.abspath(cfg.conflicts))
    ds = LlavaJsonDataset(replace(data_cfg, data_path=cfg.conflicts, image_folder=folder), tok)
    layers = moe_layers(model)
    if not layers:
        return {"split": cfg.conflicts, "note": "the model has no routed MoE layer"}
    n, E, P = min(len(ds), cfg.conflict_samples), model.cfg.lm.moe.num_experts, model.cfg.image_positions
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)   # noqa: E731
    pairs, conflicts, cos = zeros(len(layers), E), zeros(len(layers), E), zeros(len(layers), E)
    kind_pairs, kind_conflicts = zeros(len(layers), len(KINDS)), zeros(len(layers), len(KINDS))
    kind_cos, route = zeros(len(layers), len(KINDS)), zeros(len(layers), sums_width(E))
    domains, domain_counts = {}, {}                                    # name -> row; layer -> {row: [E] first choices}
    # The tower and projector are not needed in the graph: gradients are taken at the MoE layer outputs.
    frozen = [p for m in (model.vision_tower, model.projector) for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    used = 0
    try:
        for start in tqdm(range(0, n, cfg.batch_size), desc="conflicts", unit="batch"):
            samples = [x for x in (ds[k] for k in range(start, min(n, start + cfg.batch_size))) if isinstance(x, dict)]
            batch = collate(samples, tok.pad_id, "right", data_cfg.image_size)
            if batch["input_ids"].shape[0] == 0:
                continue
            with torch.enable_grad():
                images = batch["images"].to(device) if len(batch["images"]) else None
                out = model(batch["input_ids"].to(device), images, labels=batch["labels"].to(device),
                            attention_mask=batch["attention_mask"].to(device))
                if int(out.num_tokens) == 0:
                    continue
                deltas = torch.autograd.grad(out.loss, [r.output for r in out.routing], allow_unused=True)
            used += batch["input_ids"].shape[0]
            T, kinds = out.routing[0].shape[1], []                     # kind of each position, right-padded
            for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].bool()):
                k = prompt_kinds(ids[m].tolist(), P, lab[m].tolist())
                kinds.append(k + [-1] * (T - len(k)))
            kinds = torch.tensor(kinds)                                # [B, T]
            names = [ds.records[x["index"]].get("domain") if isinstance(ds.records[x["index"]], dict) else None
                     for x in samples]
            domain_BT = torch.tensor([[domains.setdefault(d, len(domains)) if d is not None else -1] * T for d in names])
            for j, (r, d) in enumerate(zip(out.routing, deltas)):
                route[j] += layer_sums(r).cpu().double()
                labelled = (domain_BT.reshape(-1) >= 0) & (kinds.reshape(-1) >= 0)   # real tokens with a domain
                first = r.experts[:, 0].cpu()
                for row in domain_BT.reshape(-1)[labelled].unique().tolist():
                    m = labelled & (domain_BT.reshape(-1) == row)
                    counts = domain_counts.setdefault(j, {}).setdefault(row, zeros(E))
                    counts += torch.bincount(first[m], minlength=E).double()
                d = torch.zeros_like(r.output) if d is None else d
                c = find_conflicts(r, d.reshape(-1, d.shape[-1]), stgc_cfg)
                pair, conflict = c.pair.cpu().double(), c.conflict.cpu().double()
                expert, kind = c.expert.cpu(), kinds.reshape(-1)[c.token.cpu()]
                pairs[j].index_add_(0, expert, pair)
                conflicts[j].index_add_(0, expert, conflict)
                cos[j].index_add_(0, expert, c.cos.cpu().double() * pair)
                for k in range(len(KINDS)):
                    kind_pairs[j, k] += pair[kind == k].sum()
                    kind_conflicts[j, k] += conflict[kind == k].sum()
                    kind_cos[j, k] += (c.cos.cpu().double() * pair)[kind == k].sum()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    ratio = lambda a, b: float(a / b) if b > 0 else 0.0   # noqa: E731
    out_layers = []
    for j, (i, _) in enumerate(layers):
        out_layers.append({
            "layer": i, "pairs": int(pairs[j].sum()), "conflict_ratio": ratio(conflicts[j].sum(), pairs[j].sum()),
            "mean_cos": ratio(cos[j].sum(), pairs[j].sum()),
            "per_expert": [{"pairs": int(pairs[j, e]), "conflict_ratio": ratio(conflicts[j, e], pairs[j, e]),
                            "mean_cos": ratio(cos[j, e], pairs[j, e])} for e in range(E)],
            "per_kind": {k: {"pairs": int(kind_pairs[j, n]), "conflict_ratio": ratio(kind_conflicts[j, n], kind_pairs[j, n]),
                             "consistency": ratio(kind_cos[j, n], kind_pairs[j, n])} for n, k in enumerate(KINDS)},
            "routing": layer_stats(route[j].tolist(), E, model.cfg.lm.moe.top_k)})
        if len(domains) >= 2:                                          # expert-domain specialisation (GAR §5)
            rows = domain_counts.get(j, {})
            out_layers[-1]["domain"] = purity_nmi([rows.get(r, zeros(E)).tolist() for r in range(len(domains))])
    # definition: the LM-loss gradient at each MoE layer's output, as stgc.py's reference (not the fast path's)
    return {"split": cfg.conflicts, "samples": used, "grad_source": stgc_cfg.grad_source, "threshold": stgc_cfg.threshold,
            "definition": "lm_loss",
            "layers": out_layers, "domains": list(domains),
            "skipped": ds.report() if ds.stats.skipped else ""}

# -----------------------------------------------------------------------------
# 5. The run


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run(cfg: EvalConfig, rank: int | None = None, world: int | None = None) -> dict:
    """Evaluate; returns {benchmark: metrics} (on rank 0; {} on other ranks). rank/world default to
    torchrun's; tests pass them to play the ranks of a sharded run one after another."""
    device = torch.device(cfg.device) if cfg.device != "auto" else None
    if rank is None:
        rank, world, auto = setup_distributed()                      # model.py: torchrun's ranks, as train.py's
        device = device or auto
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = selected(cfg)
    loaded = {n: load_benchmark(cfg, n) for n in names}                 # all files checked before generating
    model, tok, data_cfg, template = load_model(cfg, device)
    files = checkpoint_files(cfg)                                        # hashed once, for every benchmark
    loading = ExpertLoading(model) if cfg.expert_loading and moe_layers(model) else None
    results, analysis = {}, {}
    for name in names:
        bench, (questions, gold) = BENCHMARKS[name], loaded[name]
        folder = os.path.join(cfg.out, "answers", name, cfg.model_id)
        os.makedirs(folder, exist_ok=True)
        fp = answer_fingerprint(cfg, name, files, device)
        if rank == 0:
            claim_answer_folder(folder, fp, rank)                            # answers of another checkpoint aside
        barrier()
        if rank != 0:
            claim_answer_folder(folder, fp, rank)
        done = read_answers(folder)
        todo = [q for q in shard(questions, rank, world) if q.key not in done]
        reused = sum(q.key in done for q in questions)
        if rank == 0 and reused:
            print(f"eval: {name}: reusing {reused} of {len(questions)} answers of checkpoint {fp['fingerprint']} "
                  f"from {folder}")
        path = os.path.join(folder, f"{world}_{rank}.jsonl")
        repair_tail(path)
        if loading is not None:
            loading.reset()
        generate_answers(model, tok, template, data_cfg, bench, todo, cfg, path, loading, show=rank == 0)
        summary = loading.summary(len(todo)) if loading is not None else None   # on all ranks (all-reduce)
        barrier()
        if rank != 0:
            continue
        answers = merge_answers(folder, questions)
        metrics = bench.score(answers, questions, gold, cfg.out, cfg.model_id)
        results[name] = metrics | {"answers": os.path.join(folder, "merge.jsonl"), "generated_now": len(todo),
                                   "fingerprint": fp["fingerprint"]}
        if len(answers) < len(questions):
            print(f"eval: {name}: {len(answers)} of {len(questions)} questions answered (other ranks unfinished?)")
        if summary is not None and sum(summary["tokens"].values()):
            analysis[name] = summary
    if rank == 0:
        report = {"model_id": cfg.model_id, "checkpoint": cfg.checkpoint, "benchmarks": results}
        if cfg.conflicts:
            report["conflicts"] = conflict_statistics(model, tok, data_cfg, cfg, device)
        write_results(cfg, report, analysis)
        print(format_table(results))
    if loading is not None:
        for h in loading.hooks:
            h.remove()
    barrier()
    return results


def write_results(cfg: EvalConfig, report: dict, analysis: dict):
    """results.json (merged with an earlier run's, benchmark by benchmark) and the analysis files."""
    path = os.path.join(cfg.out, "results.json")
    old = read_json(path) if os.path.isfile(path) else {}
    report["benchmarks"] = old.get("benchmarks", {}) | report["benchmarks"]
    os.makedirs(os.path.join(cfg.out, "analysis"), exist_ok=True)
    with open(path, "w") as f:
        json.dump(old | report, f, indent=1)
    if analysis:
        apath = os.path.join(cfg.out, "analysis", "expert_loading.json")
        merged = (read_json(apath) if os.path.isfile(apath) else {}) | analysis
        with open(apath, "w") as f:
            json.dump(merged, f, indent=1)
        plot_expert_loading(merged, os.path.join(cfg.out, "analysis", "expert_loading.png"))
        for name, a in analysis.items():
            if a.get("pathways", {}).get("total"):
                plot_pathways(a, name, os.path.join(cfg.out, "analysis", f"pathways_{name}.png"))
        spec = specialisation(merged)
        if spec:
            with open(os.path.join(cfg.out, "analysis", "specialisation.json"), "w") as f:
                json.dump(spec, f, indent=1)
    if "conflicts" in report:
        with open(os.path.join(cfg.out, "analysis", "conflicts.json"), "w") as f:
            json.dump(report["conflicts"], f, indent=1)


def format_table(results: dict) -> str:
    rows = [("benchmark", "metric", "value", "answered")]
    for name, m in results.items():
        head = BENCHMARKS[name].headline
        if head in m:
            value = f"{m[head]:.2f}"
        else:   # graded elsewhere (GPT judges, EvalAI, OpenCompass): point at the file
            value = next((m[k] for k in ("submission", "grader_input", "judge_input") if k in m), "-")
        rows.append((name, head if head in m else "file", value, f"{m.get('n', 0)}/{m.get('n_questions', 0)}"))
    widths = [max(len(str(r[c])) for r in rows) for c in range(3)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r[:3], widths)) + "  " + str(r[3]) for r in rows)


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalConfig.__dataclass_fields__
    p.add_argument("--checkpoint", required=True, help="our checkpoint dir, or an HF LLaVA / MoE-LLaVA dir")
    p.add_argument("--benchmark", default="all", help=f"'all' or a comma-separated list of: {', '.join(BENCHMARKS)}")
    p.add_argument("--data", default=d["data"].default, help="the benchmarks' root (LLaVA-1.5 eval.zip layout)")
    for name in ("vision_tower", "out", "model_id", "image_folder", "template", "tokenizer", "device", "dtype",
                 "conflicts", "question_prefix"):
        p.add_argument("--" + name.replace("_", "-"), default=d[name].default)
    p.add_argument("--image", default="", metavar="FILE", help="single-question mode: the image (with --question)")
    p.add_argument("--question", default="", help="single-question mode: print the greedy answer, run no benchmark")
    p.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"].default)
    for name in ("batch_size", "max_samples", "max_new_tokens", "workers", "conflict_samples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default)
    p.add_argument("--questions", action="append", default=[], metavar="NAME=FILE",
                   help="replace a benchmark's question file (e.g. vqav2=.../val.jsonl)")
    p.add_argument("--annotations", action="append", default=[], metavar="NAME=FILE",
                   help="annotation file for local scoring (vqav2, vizwiz, gqa, textvqa; a dir for pope, mme)")
    p.add_argument("--no-expert-loading", action="store_true")
    a = p.parse_args(argv)

    def pairs(items, flag):
        if any("=" not in x for x in items):
            p.error(f"{flag} takes NAME=FILE")
        return dict(x.split("=", 1) for x in items)
    kw = {f.name: getattr(a, f.name) for f in fields(EvalConfig) if hasattr(a, f.name)}
    kw |= {"questions": pairs(a.questions, "--questions"), "annotations": pairs(a.annotations, "--annotations"),
           "expert_loading": not a.no_expert_loading}
    try:
        return EvalConfig(**kw)
    except ValueError as e:
        p.error(str(e))


def ask(cfg: EvalConfig, device=None) -> str:
    """Single-question mode, one turn of MoE-LLaVA's serve/cli.py: cfg.question (after an <image> when cfg.image is
    given) in the checkpoint's template, the image preprocessed as its training did, greedy decoding (the CLI
    samples at temperature 0.2; greedy is reproducible) up to --max-new-tokens (0: 512, the CLI's default)."""
    device = device or torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    model, tok, data_cfg, template = load_model(cfg, device)
    user = (IMAGE_PLACEHOLDER + "\n" if cfg.image else "") + cfg.question
    q = Question(question_id=0, prompt=cfg.question, user=user, image=cfg.image or None)
    _, ids, image = PromptSet([q], tok, template, data_cfg, cfg.question_prefix)[0]
    new = model.generate([ids], image[None] if image is not None else None, max_new_tokens=cfg.max_new_tokens or 512,
                         eos_token_id=stop_ids(tok, template), repetition_penalty=cfg.repetition_penalty)[0]
    text = tok.decode(new).strip()                                     # as generate_answers decodes
    return text.removesuffix(template.sep2).strip() if template.sep2 else text


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.question:
        print(ask(cfg))
        return
    try:
        run(cfg)
    except (DataFileError, FileNotFoundError) as e:
        sys.exit(f"eval.py: {e}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
