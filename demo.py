"""
demo.py: the whole method, end to end, on a laptop CPU in minutes.

    python demo.py                 # build the synthetic dataset, stages I -> II -> III (MoE + STGC), evaluate
    python demo.py --quick         # the same pipeline in seconds on a few samples (tests/test_demo.py)

1. data      data.build_synthetic_dataset: 48-pixel scenes of coloured shapes in a 2x2 grid and seven kinds
             of questions about them (colour, counting, position, reading a word, POPE-style existence,
             multiple choice, text-only arithmetic), plus eval files in the real benchmarks' formats;
             rebuilt when --data holds a set built with other sizes (--quick's, say).
2. stage I   captions of the training images; every weight trains, because the tower and the LLM start
             from random weights here (the papers train only the projector on top of pretrained ones).
3. stage II  instruction tuning on the seven domains; the LLM, projector and tower train.
4. stage III MoE-LLaVA upcycling (4 experts, top-2, every other layer) with STGC's Conflict Elimination
             Loss; experts, routers and projector train (docs/moe_llava.md §1.9), the tower is frozen from here on.
5. eval      eval.py's real runner and metric code on the synthetic GQA / ScienceQA / TextVQA / POPE files,
             for the stage-II (dense) and stage-III (MoE + STGC) checkpoints; expert loading per benchmark.

Every stage is one `train.py` run: configs/demo.toml holds the shared settings and STAGES below the
per-stage overrides, the same `--section.key=value` strings you can pass on the command line.
Outputs: <out>/stage{1,2,3}/ (checkpoints, log.jsonl), <out>/eval_*/ (answers, results.json, analysis),
<out>/results.json (the table below). bench/experiment.py builds the controlled comparison on top of this.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

import train
from data import build_synthetic_dataset
from eval import EvalConfig, run as run_eval

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.toml")

# (name, what it is, overrides of configs/demo.toml). Learning rates: 5e-4 learns the images from random
# weights; 2e-3 (tried first) collapses onto a language-only solution that never looks at the image.
STAGES = [
    ("stage1", "I: captions, every weight trains",
     ["--data.data_path={data}/pretrain.json", "--data.template=plain", "--train.epochs=5", "--train.lr=5e-4"]),
    ("stage2", "II: instruction tuning, LLM + projector + tower",
     ["--init.source=checkpoint", "--init.checkpoint={out}/stage1", "--train.epochs=6", "--train.lr=5e-4"]),
    ("stage3", "III: MoE (4 experts, top-2) + STGC, experts + routers + projector",
     ["--init.source=checkpoint", "--init.checkpoint={out}/stage2", "--train.stage=moe", "--train.epochs=2",
      "--train.lr=2e-4", "--train.train_vision_tower=false", "--stgc.enabled=true"]),
]
DOMAINS = ("color", "count", "spatial", "ocr", "pope", "mc", "text")
QUICK = ["--train.max_steps=2", "--train.global_batch_size=4", "--train.micro_batch_size=2"]


# One CPU thread: on 2 idle cores 2 threads are 1.7-1.9x faster, but as soon as another job takes a core they are
# 1.7-4x slower (a demo step is many small ops, each waiting for the preempted thread): bench/demo_threads.py, README.
DEFAULT_THREADS = 1
DATA = dict(seed=0, n_train=4000, n_val=200, n_test=400, image_size=48)      # build_synthetic_dataset's defaults
QUICK_DATA = DATA | dict(n_train=64, n_val=8, n_test=16)


def built_with(data_dir: str) -> dict | None:
    """The parameters the synthetic set in data_dir was built with, read back from its meta.json (the sizes
    are its per-split domain counts); None when there is no complete set (the tokenizer is written last)."""
    if not all(os.path.isfile(os.path.join(data_dir, n)) for n in ("meta.json", "tokenizer.json")):
        return None
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    splits = meta.get("splits", {})
    return {"seed": meta.get("seed"), "image_size": meta.get("image_size")} | {
        f"n_{s}": sum(splits.get(s, {}).values()) for s in ("train", "val", "test")}


def build_data(data_dir: str, params: dict) -> str:
    """Build the synthetic set into data_dir unless the one there was built with these parameters; a set built
    with others (`--quick`'s, then the full demo's) is rebuilt, and the line says so."""
    have = built_with(data_dir)
    if have == params:
        print(f"demo: using the synthetic set in {data_dir} ({params})")
        return data_dir
    if have is not None:
        differ = ", ".join(f"{k}={have.get(k)} (asked {v})" for k, v in params.items() if have.get(k) != v)
        print(f"demo: the synthetic set in {data_dir} was built with {differ}: rebuilding it")
        for sub in ("images", "eval"):                  # no image or eval file of the old set stays behind
            shutil.rmtree(os.path.join(data_dir, sub), ignore_errors=True)
    build_synthetic_dataset(data_dir, **params)
    return data_dir


def data_overrides(data_dir: str) -> list[str]:
    return [f"--data.data_path={data_dir}/train.json", f"--data.image_folder={data_dir}/images",
            f"--data.tokenizer_path={data_dir}/tokenizer.json"]


def train_stage(name: str, overrides: list[str], out: str, data_dir: str, extra=()) -> str:
    """One train.py run; returns its checkpoint dir. The demo retrains every stage on each run, so it replaces the
    stage's previous run in its dir (train.overwrite)."""
    argv = ["--config", CONFIG, f"--train.out_dir={out}/{name}", "--train.overwrite=true"] + data_overrides(data_dir)
    argv += [o.format(out=out, data=data_dir) for o in overrides] + list(extra)
    return train.main(argv)


def evaluate(checkpoint: str, data_dir: str, out: str, max_samples: int = 0) -> dict:
    """eval.py on the synthetic benchmark files; returns {benchmark: metrics}."""
    cfg = EvalConfig(checkpoint=checkpoint, benchmark="all", data=os.path.join(data_dir, "eval"), out=out,
                     batch_size=64, max_samples=max_samples, model_id=os.path.basename(out), device="cpu")
    return run_eval(cfg, rank=0, world=1)


def domain_scores(benchmarks: dict) -> dict:
    """The synthetic domains, as the benchmark files hold them: GQA's colour / count / position questions
    (its 'detailed' type), TextVQA = reading, POPE = existence (mean F1), ScienceQA = multiple choice on an
    image, and its text-only problems."""
    gqa, sqa = benchmarks.get("gqa", {}), benchmarks.get("scienceqa", {})
    per_type = gqa.get("per_type", {})
    out = {d: per_type.get(f"detailed/{d}") for d in ("color", "count", "spatial")}
    out["ocr"] = benchmarks.get("textvqa", {}).get("accuracy")
    out["pope"] = benchmarks.get("pope", {}).get("f1_mean")
    out["mc"] = sqa.get("img_accuracy")
    n, n_img = sqa.get("n_scored", 0), sqa.get("n_img", 0)            # accuracy's and img_accuracy's denominators
    out["text"] = (sqa["accuracy"] * n - sqa["img_accuracy"] * n_img) / (n - n_img) if n > n_img else None
    return out


def conflict_curve(log_path: str) -> dict:
    """Per logged step of a run that measured conflicts: the conflict ratio and the expert consistency (mean
    cosine of a token's gradient to its expert's mean), averaged over the MoE layers."""
    steps, ratio, cos = [], [], []
    for line in open(log_path):
        row = json.loads(line)
        if row.get("stgc"):
            steps.append(row["step"])
            ratio.append(statistics.fmean(layer["conflict_ratio"] for layer in row["stgc"]))
            cos.append(statistics.fmean(layer["mean_cos"] for layer in row["stgc"]))
    return {"step": steps, "conflict_ratio": ratio, "mean_cos": cos}


def stgc_summary(log_path: str) -> dict:
    """The conflict curve's first and last logged steps."""
    c = conflict_curve(log_path)
    if not c["step"]:
        return {}
    return {"conflict_ratio_first": c["conflict_ratio"][0], "conflict_ratio_last": c["conflict_ratio"][-1],
            "mean_cos_first": c["mean_cos"][0], "mean_cos_last": c["mean_cos"][-1]}


def format_table(rows: dict) -> str:
    lines = [f"{'model':<22}" + "".join(f"{d:>9}" for d in DOMAINS) + f"{'mean':>9}"]
    for name, scores in rows.items():
        values = [scores.get(d) for d in DOMAINS]
        known = [v for v in values if v is not None]
        cells = "".join(f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in values)
        lines.append(f"{name:<22}{cells}{sum(known) / max(len(known), 1):>9.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", default="out/demo")
    p.add_argument("--data", default="out/synthetic",
                   help="the synthetic dataset (built there if absent or built with other sizes)")
    p.add_argument("--quick", action="store_true", help="a few steps and samples: checks the pipeline in seconds")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"CPU threads for torch (default {DEFAULT_THREADS}: measured fastest on shared cores, bench/demo_threads.py)")
    args = p.parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_demo(args)
    except train.Stopped as e:                                         # Ctrl-C: no table of a half-trained model
        sys.exit(f"demo: {e}; rerun demo.py to start it again")
    finally:
        torch.set_num_threads(previous)                                # tests call main in-process


def run_demo(args) -> dict:
    t0, times = time.perf_counter(), {}
    data_dir = build_data(args.data, QUICK_DATA if args.quick else DATA)
    times["data"] = time.perf_counter() - t0
    checkpoints = {}
    for name, what, overrides in STAGES:
        print(f"\n==== stage {what} ====")
        t = time.perf_counter()
        checkpoints[name] = train_stage(name, overrides, args.out, data_dir, QUICK if args.quick else ())
        times[name] = time.perf_counter() - t
    t = time.perf_counter()
    max_samples = 4 if args.quick else 0
    results = {"dense (stage II)": evaluate(checkpoints["stage2"], data_dir, f"{args.out}/eval_stage2", max_samples),
               "MoE + STGC (stage III)": evaluate(checkpoints["stage3"], data_dir, f"{args.out}/eval_stage3", max_samples)}
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    scores = {name: domain_scores(b) for name, b in results.items()}
    stgc = stgc_summary(os.path.join(args.out, "stage3", "log.jsonl"))
    report = {"scores": scores, "stgc": stgc, "seconds": times, "checkpoints": checkpoints}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)

    print("\n==== results: accuracy (%) per domain on the synthetic test images; POPE = F1 ====")
    print(format_table(scores))
    if stgc:
        print(f"STGC in stage III: conflicting (token, expert) pairs {stgc['conflict_ratio_first']:.1%} at the "
              f"first logged step -> {stgc['conflict_ratio_last']:.1%} at the last; mean cosine of a token's "
              f"gradient to its expert's mean {stgc['mean_cos_first']:.3f} -> {stgc['mean_cos_last']:.3f}")
    print(f"time: {', '.join(f'{k} {v:.0f}s' for k, v in times.items())}")
    print(f"outputs: {args.out}/ (results.json; stage*/log.jsonl; eval_stage*/answers, results.json, "
          f"analysis/expert_loading.json)")
    print("does STGC move conflicting tokens where conflict is known? README 'The conflict testbed' (bench/experiment.py --testbed)")
    return report


if __name__ == "__main__":
    main()
