"""
The controlled comparison on the synthetic multi-domain dataset: from the demo's stage-II checkpoint,
train each variant for the same steps on the same data (stage III), then evaluate with eval.py's metric
code. Per variant and seed: per-domain accuracy, the conflict ratio and gradient consistency over training
(measured for every routed variant; the CEL only acts where STGC is on), and expert loading per domain.

    .venv/bin/python demo.py                               # once: builds out/demo/stage2
    .venv/bin/python bench/experiment.py                   # 7 variants x 3 seeds (about 45 min on 2 CPU cores)
    .venv/bin/python bench/experiment.py --variants moe moe_stgc --seeds 0
    .venv/bin/python bench/experiment.py --testbed [--quick]   # the conflict testbed instead (bench/testbed.py)

Writes <out>/results.json, <out>/table.md (mean ± std over seeds) and, with matplotlib, <out>/accuracy.png,
<out>/conflicts.png and <out>/loading.png. A finished (variant, seed) is reused on a rerun.

Equal compute here means equal optimizer steps over the same samples in the same order (the seed sets the
order and the router init). It does not equalise FLOPs: a top-2 MoE step does about twice the FFN work of
the dense one, and a LoRA step less.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from demo import DOMAINS, conflict_curve, domain_scores, evaluate, train_stage  # noqa: E402
from data import file_sha256  # noqa: E402
from eval import read_json  # noqa: E402

# Stage-III overrides of configs/demo.toml per variant. "Measure only" runs compute the conflicts with the
# CEL weight at 0, so every routed variant reports conflicts and none but the STGC ones is pushed by them.
COMMON = ["--init.source=checkpoint", "--init.checkpoint={base}", "--train.epochs=2", "--train.lr=2e-4",
          "--train.train_vision_tower=false"]
MEASURE, CEL = ["--stgc.enabled=true", "--stgc.loss_weight=0.0"], ["--stgc.enabled=true"]
# MoLE with the released semantics (docs/llava_mole.md §1; configs/mole_llava15.toml): 3 experts on every MLP, rank 16,
# alpha 32, attention LoRA, router bias, the soft mixture, the released balance loss. The stage-II base fixes the
# vision side (the demo's last-layer features, no start / end tokens). LoRA: the same adapters without experts.
LORA = ["--moe.layers=dense", "--moe.lora_rank=16", "--moe.lora_alpha=32.0", "--moe.attn_lora_rank=16"]
MOLE = ["--train.stage=mole", "--moe.kind=lora", "--moe.top_k=1", "--moe.num_experts=3", "--moe.mole_router_bias=true",
        "--moe.mole_mixture=soft", "--moe.mole_top1_gate=one", "--moe.mole_balance=released"] + LORA
VARIANTS = {
    "dense": ["--train.stage=finetune", "--stgc.enabled=false"],
    "moe": ["--train.stage=moe"] + MEASURE,
    "moe_stgc": ["--train.stage=moe"] + CEL,
    "moe_stgc_b0.5": ["--train.stage=moe", "--stgc.enabled=true", "--stgc.loss_weight=0.5"],   # 50x the default beta
    "mole": MOLE + MEASURE,
    "mole_stgc": MOLE + CEL,
    "lora": ["--train.stage=lora", "--stgc.enabled=false"] + LORA,
    # the routing objectives STGC is compared with (docs/routing.md), on the same MoE layer, defaults otherwise:
    # aux-loss-free balancing replaces the aux loss (DeepSeek-V3), z-loss is added to it (ST-MoE, Megatron's 1e-3)
    "moe_auxfree": ["--train.stage=moe", "--moe.aux_loss_coef=0.0", "--moe.expert_bias=true"] + MEASURE,
    "moe_zloss": ["--train.stage=moe", "--moe.z_loss_coef=0.001"] + MEASURE,
    "moe_stgc_auxfree": ["--train.stage=moe", "--moe.aux_loss_coef=0.0", "--moe.expert_bias=true"] + CEL,
}
DEFAULT_VARIANTS = ["dense", "moe", "moe_stgc", "moe_stgc_b0.5", "mole", "mole_stgc", "lora"]


def run_key(variant: str, seed: int, overrides: list, args) -> dict:
    """What produces a (variant, seed) result: its overrides, the base checkpoint's weights and config, the data
    set, the evaluation sample count and the code. A cached summary is reused only when all of these match."""
    import hashlib
    import train
    base = train.latest_checkpoint(args.base)
    h = hashlib.sha256("".join(file_sha256(os.path.join(base, n)) for n in ("config.json", "model.safetensors")).encode())
    eval_code = hashlib.sha256(b"".join(open(os.path.join(os.path.dirname(__file__), "..", n), "rb").read()
                                        for n in ("eval.py", "benchmarks.py", "routing.py", "demo.py"))).hexdigest()[:12]
    return {"variant": variant, "seed": seed, "overrides": overrides, "base": h.hexdigest()[:16],
            "data": file_sha256(os.path.join(args.data, "train.json"))[:16], "max_samples": args.max_samples,
            "train_code": train.code_version(), "eval_code": eval_code}


def run_one(variant: str, seed: int, args) -> dict:
    """Train and evaluate one (variant, seed); cached in <out>/<variant>_s<seed>/summary.json."""
    name = f"{variant}_s{seed}"
    summary_path = os.path.join(args.out, name, "summary.json")
    overrides = [o.format(base=args.base) for o in COMMON + VARIANTS[variant]] + [f"--train.seed={seed}"] + args.extra.split()
    key = run_key(variant, seed, overrides, args)
    if os.path.isfile(summary_path):
        cached = read_json(summary_path)
        if cached.get("key") == key:
            return cached
    shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)   # a run cut short or stale: start it afresh
    checkpoint = train_stage(name, overrides, args.out, args.data)
    benchmarks = evaluate(checkpoint, args.data, os.path.join(args.out, name, "eval"), max_samples=args.max_samples)
    loading_path = os.path.join(args.out, name, "eval", "analysis", "expert_loading.json")
    spec_path = os.path.join(args.out, name, "eval", "analysis", "specialisation.json")
    summary = {"variant": variant, "seed": seed, "key": key, "scores": domain_scores(benchmarks),
               "stgc": conflict_curve(os.path.join(args.out, name, "log.jsonl")),
               "loading": read_json(loading_path) if os.path.isfile(loading_path) else {},
               "specialisation": read_json(spec_path) if os.path.isfile(spec_path) else {}}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def busiest_share(loading: dict):
    """Share of the tokens taken by the busiest expert, averaged over benchmarks and MoE layers (1/E when
    balanced): how unevenly the router spreads the evaluation tokens."""
    shares = [max(layer) for b in loading.values() for layer in b["all"]["total"] if b["num_experts"] > 1]
    return statistics.fmean(shares) if shares else None


def load_variance(loading: dict):
    """Variance of the experts' shares of the evaluation tokens (routing.py), mean over benchmarks and MoE layers."""
    values = [layer["load_var"] for b in loading.values() for layer in b.get("routing", [])]
    return statistics.fmean(values) if values else None


def purity(spec: dict):
    """Expert-benchmark purity (eval's specialisation.json), mean over MoE layers; 1/B when routing ignores the benchmark."""
    values = [layer["purity"] for layer in spec.get("layers", [])]
    return statistics.fmean(values) if values else None


def top_pathway(loading: dict):
    """(pathway, share) of the most frequent first-choice pathway over all benchmarks' tokens."""
    counts = {}
    for b in loading.values():
        for path, n, _ in b.get("pathways", {}).get("total", []):
            counts[tuple(path)] = counts.get(tuple(path), 0) + n
    total = sum(ranked[0][1] / ranked[0][2] for ranked in (b.get("pathways", {}).get("total", []) for b in loading.values())
                if ranked and ranked[0][2] > 0)                       # n / share: each benchmark's token count
    if not counts:
        return None
    path, n = max(counts.items(), key=lambda kv: kv[1])
    return "-".join(map(str, path)), n / max(total, 1)


def table(runs: dict) -> str:
    """Markdown: per-domain accuracy mean ± std over seeds, the conflict ratio late in training, the busiest expert's
    share and the load variance of the evaluation tokens, expert-benchmark purity, and seed 0's top pathway."""
    head = ("| variant | " + " | ".join(DOMAINS) + " | mean | conflict ratio (last 25% of steps) | busiest expert's share "
            "| load variance | purity | top pathway (seed 0) |")
    lines = [head, "|" + "---|" * (len(DOMAINS) + 7)]
    for variant, summaries in runs.items():
        cells = []
        for d in DOMAINS:
            m, s = mean_std([x["scores"][d] for x in summaries])
            cells.append("-" if m is None else f"{m:.1f} ± {s:.1f}")
        means = [statistics.fmean(v for v in x["scores"].values() if v is not None) for x in summaries]
        m, s = mean_std(means)
        late = [statistics.fmean(c[len(c) * 3 // 4:]) for c in (x["stgc"]["conflict_ratio"] for x in summaries) if c]
        cm, cs = mean_std(late)
        conflict = "-" if cm is None else f"{cm:.1%} ± {cs:.1%}"
        bm, bs = mean_std([busiest_share(x["loading"]) for x in summaries])
        busiest = "-" if bm is None else f"{bm:.3f} ± {bs:.3f}"
        vm, vs = mean_std([load_variance(x["loading"]) for x in summaries])
        variance = "-" if vm is None else f"{vm:.4f} ± {vs:.4f}"
        pm, ps = mean_std([purity(x.get("specialisation", {})) for x in summaries])
        pure = "-" if pm is None else f"{pm:.3f} ± {ps:.3f}"
        top = top_pathway(summaries[0]["loading"]) if summaries else None
        path = "-" if top is None else f"{top[0]} ({top[1]:.1%})"
        lines.append(f"| {variant} (n={len(summaries)}) | " + " | ".join(cells) + f" | {m:.1f} ± {s:.1f} | {conflict} | {busiest} "
                     f"| {variance} | {pure} | {path} |")
    return "\n".join(lines)


def plots(runs: dict, out: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("experiment: matplotlib not installed, no plots (pip install matplotlib)")
        return
    # 1. per-domain accuracy, mean ± std over seeds
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / len(runs)
    for i, (variant, summaries) in enumerate(runs.items()):
        stats = [mean_std([x["scores"][d] for x in summaries]) for d in DOMAINS]
        xs = [j + i * width for j in range(len(DOMAINS))]
        ax.bar(xs, [m or 0 for m, _ in stats], width, yerr=[s or 0 for _, s in stats], label=variant, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(DOMAINS))], DOMAINS)
    ax.set_ylabel("accuracy % (POPE: F1)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)
    plt.close(fig)
    # 2. conflict ratio and consistency over training, mean over seeds
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for variant, summaries in runs.items():
        curves = [x["stgc"] for x in summaries if x["stgc"]["step"]]
        if not curves:
            continue
        n = min(len(c["step"]) for c in curves)
        for ax, key in zip(axes, ("conflict_ratio", "mean_cos")):
            ax.plot(curves[0]["step"][:n], [statistics.fmean(c[key][i] for c in curves) for i in range(n)], label=variant)
    axes[0].set_title("conflicting (token, expert) pairs", fontsize=9)
    axes[1].set_title("gradient consistency: mean cos(g_token, g_expert mean)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("stage-III step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "conflicts.png"), dpi=120)
    plt.close(fig)
    # 3. expert loading per domain (benchmark), seed 0 of each routed variant, averaged over MoE layers
    routed = {v: s[0]["loading"] for v, s in runs.items() if s and s[0]["loading"] and s[0]["loading"].get(
        next(iter(s[0]["loading"]), ""), {}).get("num_experts", 1) > 1}
    if routed:
        fig, axes = plt.subplots(1, len(routed), figsize=(3.2 * len(routed), 2.6), squeeze=False)
        for k, (ax, (variant, loading)) in enumerate(zip(axes[0], routed.items())):
            names = list(loading)
            grid = [[statistics.fmean(layer[e] for layer in loading[b]["all"]["total"]) for e in range(loading[b]["num_experts"])]
                    for b in names]
            im = ax.imshow(grid, vmin=0, vmax=0.5, cmap="viridis")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.3 else "k")
            ax.set_yticks(range(len(names)), names if k == 0 else [], fontsize=7)
            ax.set_xticks(range(len(grid[0])), [f"e{e}" for e in range(len(grid[0]))], fontsize=7)
            ax.set_title(variant, fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of tokens")
        fig.savefig(os.path.join(out, "loading.png"), dpi=120)
        plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--testbed" in argv:                                           # a separate experiment with its own options
        import testbed
        return testbed.main([a for a in argv if a != "--testbed"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                epilog="--testbed [OPTIONS]: the conflict testbed instead (bench/testbed.py --help)")
    p.add_argument("--base", default="out/demo/stage2", help="the stage-II checkpoint every variant starts from")
    p.add_argument("--data", default="out/synthetic")
    p.add_argument("--out", default="out/experiment")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help=f"default {' '.join(DEFAULT_VARIANTS)}; the routing objectives: moe_auxfree moe_zloss moe_stgc_auxfree")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-samples", type=int, default=600, help="per benchmark (POPE has 2,000 questions)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--extra", default="", help="more overrides for every run, one string: '--train.epochs=3 ...'")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:                                                   # one (variant, seed), then exit
        return run_one(args.variants[0], args.seeds[0], args)
    # Each run in its own process: a fresh interpreter per run keeps memory flat over 18 runs and makes a
    # run's timing independent of the ones before it.
    for v in args.variants:
        for seed in args.seeds:
            path = os.path.join(args.out, f"{v}_s{seed}", "summary.json")
            overrides = [o.format(base=args.base) for o in COMMON + VARIANTS[v]] + [f"--train.seed={seed}"] + args.extra.split()
            cached = read_json(path) if os.path.isfile(path) else None
            if cached is None or cached.get("key") != run_key(v, seed, overrides, args):
                if cached is not None:
                    print(f"experiment: {v}_s{seed} was produced by other settings, base, data or code: rerunning it")
                worker = [sys.executable, os.path.abspath(__file__), "--worker", "--variants", v, "--seeds", str(seed),
                          "--base", args.base, "--data", args.data, "--out", args.out,
                          "--max-samples", str(args.max_samples), f"--extra={args.extra}"]
                subprocess.run(worker, check=True)
    runs = {v: [run_one(v, s, args) for s in args.seeds] for v in args.variants}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(runs, f, indent=1)
    text = table(runs)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    plots(runs, args.out)
    print(f"experiment: {args.out}/results.json, table.md, *.png")
    return runs


if __name__ == "__main__":
    main()
