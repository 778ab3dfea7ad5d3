"""The GPU suite (issue 13, item 4): every measurement this repo needs a GPU for, in one command that fits in
8 minutes on one H100/H200 and writes its rows into bench/RESULTS.md (the `gpu_suite` block).

    bash bench/gpu_suite.sh                      # picks or makes the Python, then runs this file
    python bench/gpu_suite.py                    # CUDA available: every part, real sizes
    python bench/gpu_suite.py --dry-run          # any machine: every part at tiny size on the CPU (< 2 min), into a
                                                 # copy of RESULTS.md under the output folder, never the real one
    python bench/gpu_suite.py --parts train,dispatch --budget 300
    python bench/gpu_suite.py --list             # the parts and their time caps

Parts, in this order (time cap on the GPU; each cap includes the part's own start, ~10 s of imports):
  tests     tests/test_cuda.py on real CUDA: MoE loop == grouped == padded in bf16, KV cache == full forward,
            STGC fast == reference, bf16 loss close to fp32, train_step and train.py with fused AdamW
  train     stage III at configs/moe_llava_stablelm.toml + stgc.toml (StableLM-1.6B x 4 experts + CLIP-L/14-336, random
            weights, micro-batch 8 x 2048 positions of which 576 image, activation checkpointing): train.py's
            train_step with STGC off / fast bias / fast full: step time, ratio, MFU, peak memory
            (bench/stgc_overhead.py)
  dispatch  MoE loop / grouped / padded / einsum at the StableLM-1.6B-4e FFN (D=2048, F=5632, S=8192), bf16
            autocast over fp32 weights, each checked against the loop first (bench/moe_dispatch.py)
  dense     dense StableLM-2-1.6B forward + backward, ours vs transformers, bf16 (bench/dense_vs_hf.py)
  eval      batched vs batch-1 vs transformers greedy generation, StableLM-2-1.6B bf16 (bench/eval_throughput.py)

Robustness, because a GPU is lent rarely and briefly: each part runs in its own process (its own CUDA context
and memory) under its own time cap, and all of them under the suite's budget (counted from GPU_SUITE_T0, which
bench/gpu_suite.sh sets before it installs anything). A part streams its rows as it measures them, so one that
crashes, runs out of memory or out of time keeps what it had and adds a `FAILED: <one-line error>` row; the next
part runs regardless. The block is rewritten after every part. Everything printed also goes to gpu_suite.log in
the output folder ($OUT when set, for a runner that brings that folder back; else out/gpu_suite), next to
results.json and a copy of the RESULTS.md written.

Repeats are fewer than the standalone scripts' (the budget): medians of 5 train steps (fewer if the first steps
say 5 would not end within the part's cap; the row says so), 10 dispatch rounds, 5 dense rounds, 1 eval round
after the agreement check (which warms every path up). If the grouped kernel fails on some GPU, rerun the train
part on the other fast path: --parts train --moe-impl padded.
"""
import argparse
import collections
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import common  # noqa: F401  (puts the repo root on sys.path)
from common import ROOT, update_results

MOE_IMPL_ENV = "GPU_SUITE_MOE_IMPL"   # --moe-impl: the train part's moe.impl instead of the preset's
DEADLINE_ENV = "GPU_SUITE_DEADLINE"   # when a child's time cap ends (time.time()): parts with long steps fit to it
ROWS_ENV = "GPU_SUITE_ROWS"    # the file a child appends its rows to, one JSON object a line: {"row": ...} | {"error": ...}
BLOCK = "gpu_suite"
HEADING = "GPU suite (`bench/gpu_suite.sh`)"

# name -> (time cap in seconds on the GPU, title of its section in RESULTS.md)
PARTS = {
    "tests": (75, "CUDA tests (`tests/test_cuda.py`)"),
    "train": (160, "Stage III train step at the preset, STGC off / fast bias / fast full (`bench/stgc_overhead.py`)"),
    "dispatch": (60, "MoE dispatch at the StableLM-1.6B-4e FFN (`bench/moe_dispatch.py`)"),
    "dense": (50, "Dense forward + backward vs transformers (`bench/dense_vs_hf.py`)"),
    "eval": (90, "Evaluation throughput, batched vs batch-1 (`bench/eval_throughput.py`)"),
}
BUDGET = 480                  # the whole suite, from GPU_SUITE_T0
DRY_CAP = 100                 # a part's cap in the dry run

# -----------------------------------------------------------------------------
# The parts. Each runs in a child process (`--child NAME`) and calls emit(line) for every line of its section.


def emit(line, key="row"):
    """Append one line of this part's section to the rows file (flushed at once, so a part that is stopped keeps
    its rows) and print it for the log. Stdout is not the channel: pytest's progress dots share its lines."""
    print(line, flush=True)
    with open(os.environ[ROWS_ENV], "a") as f:
        f.write(json.dumps({key: line}) + "\n")


def deadline(margin):
    """This part's time cap as a time.time(), less `margin` seconds for its teardown (None: no cap given)."""
    end = os.environ.get(DEADLINE_ENV)
    return float(end) - margin if end else None


def part_tests(dry):
    import pytest
    if dry:
        os.environ["TEST_CUDA_DEVICE"] = "cpu"   # the same tests on the CPU: their code runs, CUDA is not tested
    counts = collections.Counter()

    class Rows:
        """One row per test as soon as it ends (a run cut short keeps the rows of the tests that finished)."""

        def pytest_collectreport(self, report):
            if report.outcome != "passed":
                self.row(report.nodeid or "tests/test_cuda.py", report.outcome, 0.0, report)

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":   # a setup/teardown row only when it did not pass
                where = "" if report.when == "call" or report.outcome == "skipped" else f" in {report.when}"
                self.row(report.nodeid.split("::", 1)[-1], report.outcome + where, report.duration, report)

        @staticmethod
        def row(name, outcome, seconds, report):
            counts[outcome.split()[0]] += 1
            emit(f"| {name} | {outcome} | {seconds:.1f} | {one_line(why(report))} |")

    emit("| test | outcome | seconds | message |")
    emit("|---|---|---|---|")
    rc = pytest.main([os.path.join(ROOT, "tests", "test_cuda.py"), "-q", "-p", "no:cacheprovider"], plugins=[Rows()])
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    emit("")
    emit(f"pytest exit code {int(rc)}: {summary or 'nothing ran'}" + (" (dry run: on the CPU)" if dry else ""))
    if counts["failed"] or rc not in (0, 5):                          # 5: nothing collected
        raise RuntimeError(f"{counts['failed']} test(s) failed ({summary}; pytest exit code {int(rc)})")


def why(report):
    """A test report's reason: the skip reason, or the exception's first line."""
    if report.outcome == "passed":
        return ""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):                                   # (path, line, 'Skipped: reason')
        return longrepr[2]
    crash = getattr(longrepr, "reprcrash", None)
    return crash.message if crash is not None else str(longrepr)


def part_train(dry):
    import stgc_overhead
    import train_throughput as tt
    from model import VisionConfig
    emit(f"Preset {' + '.join(os.path.relpath(p, ROOT) for p in stgc_overhead.PRESET)}: its [train], [moe] and [stgc] sections, the model "
         "built from scratch at these sizes (random weights). MFU counts the model's FLOPs (train.flops_per_step), "
         "not STGC's extra work nor the recomputation.")
    emit("")
    for line in stgc_overhead.STAGE3_TABLE:
        emit(line)
    if dry:
        stgc_overhead.stage3_rows("dry run: tiny MoE (D=128, 4 layers) + tiny tower, fp32", tt.tiny_lm(), tt.tiny_vision(),
                                  "cpu", repeats=1, warmup=0, micro_batch=1, moe_impl=os.environ.get(MOE_IMPL_ENV),
                                  deadline=deadline(15), emit=emit)
    else:
        stgc_overhead.stage3_rows("MoE-LLaVA-StableLM-1.6B-4e + CLIP-L/14-336, bf16 autocast", tt.stablelm_1_6b(),
                                  VisionConfig(), "cuda", repeats=5, warmup=1, moe_impl=os.environ.get(MOE_IMPL_ENV),
                                  deadline=deadline(15), emit=emit)


def part_dispatch(dry):
    import torch
    import moe_dispatch
    for line in moe_dispatch.TABLE:
        emit(line)
    if dry:
        moe_dispatch.bench("dry run: tiny", 256, 704, 2, 256, "cpu", torch.bfloat16, repeats=2, warmup=1, emit=emit)
    else:
        moe_dispatch.bench("StableLM-1.6B-4e FFN", 2048, 5632, 4, 2048, "cuda", torch.bfloat16, repeats=10, warmup=2,
                           emit=emit)


def part_dense(dry):
    import torch
    import dense_vs_hf as d
    for line in d.TABLE:
        emit(line)
    if dry:
        emit(d.bench("dry run: tiny Llama: D=256, F=704, 4 layers, 4 heads, V=2048", d.tiny_config(), 2, 64, "cpu",
                     torch.float32, repeats=1, tol=1e-4, warmup=0))
    else:
        # bf16 weights in both models: they agree to bf16 rounding only, so the differences are reported, not asserted
        emit(d.bench("StableLM-2-1.6B: D=2048, F=5632, 24 layers, V=100352", d.stablelm_1_6b_config(), 4, 2048, "cuda",
                     torch.bfloat16, repeats=5, tol=None, warmup=1))


def part_eval(dry):
    import torch
    import dense_vs_hf as d
    import eval_throughput as e
    for line in e.TABLE:
        emit(line)
    if dry:
        e.bench("dry run: tiny Llama: D=256, 4 layers, V=2048", d.tiny_config(), 4, 4, "cpu", torch.float32, repeats=1,
                exact=True, warmup=0, emit=emit)
    else:
        # POPE-like first: if the cap cuts the decode-bound workload short, its row survives
        e.bench("StableLM-2-1.6B", d.stablelm_1_6b_config(), 32, 32, "cuda", torch.bfloat16, repeats=1, exact=False,
                std=None, warmup=0, emit=emit)


PART_FUNCS = {"tests": part_tests, "train": part_train, "dispatch": part_dispatch, "dense": part_dense, "eval": part_eval}


def child(name, dry):
    """Run one part in this process; a failure becomes one {"error": ...} line in the rows file and exit code 1."""
    try:
        from common import set_cpu_threads
        set_cpu_threads()
        PART_FUNCS[name](dry)
    except BaseException as e:       # noqa: BLE001  (KeyboardInterrupt / SystemExit from pytest too)
        traceback.print_exc()
        emit(one_line(f"{type(e).__name__}: {e}"), key="error")
        sys.exit(1)


def one_line(text, limit=300):
    text = " ".join(str(text).split()).replace("|", "/")             # one markdown table cell
    return text if len(text) <= limit else text[:limit - 3] + "..."

# -----------------------------------------------------------------------------
# The driver: one child per part, each under its time cap; rows and failures into the block


class Log:
    """print() that also writes to the log file."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, *lines):
        for line in lines:
            print(line, flush=True)
            self.file.write(line + "\n")


def run_part(name, cmd, cap, log, rows_file, env=None):
    """Run cmd (one part) under a time cap, streaming its output to the log. Returns a result dict: name, status
    ('ok' or 'FAILED: <one line>'), seconds, cap, rows (what it emitted into rows_file before it ended or was
    stopped)."""
    t0 = time.monotonic()
    open(rows_file, "w").close()
    env = dict(env or os.environ, **{ROWS_ENV: rows_file, DEADLINE_ENV: str(time.time() + cap)})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)                  # own process group: a timeout ends all of it
    tail = collections.deque(maxlen=5)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            log(f"[{name}] {line}")
            if line.strip():
                tail.append(line.strip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc, timed_out = proc.wait(timeout=cap), False
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
                rc = proc.wait(timeout=grace)
                break
            except ProcessLookupError:
                rc = proc.wait()
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    seconds = time.monotonic() - t0
    rows, error = [], None
    with open(rows_file) as f:
        for line in f:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:                              # a line cut short by a kill
                continue
            rows += [item["row"]] if "row" in item else []
            error = item.get("error", error)
    if timed_out:
        status = f"FAILED: timed out after {seconds:.0f} s (cap {cap:.0f} s)" + (f"; last output: {one_line(tail[-1], 150)}"
                                                                                 if tail else "")
    elif rc != 0:
        status = "FAILED: " + one_line(error or f"exit code {rc}" + (f"; last output: {tail[-1]}" if tail else ""))
    else:
        status = "ok"
    return {"name": name, "status": status, "seconds": round(seconds, 1), "cap": round(cap), "rows": rows}


def environment(log):
    """What the machine is, printed at the start; returns (header line, CUDA available)."""
    import torch
    cuda = torch.cuda.is_available()
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        log(smi.stdout.rstrip() or smi.stderr.rstrip())
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        log(f"nvidia-smi: {e}")
        query = ""
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = "not installed"
    if cuda:
        cap = torch.cuda.get_device_capability()
        device = (f"{torch.cuda.get_device_name()} (capability {cap[0]}.{cap[1]}, "
                  f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
                  + (f"; nvidia-smi: {query}" if query else "") + ")")
    else:
        device = f"no CUDA device: {os.cpu_count()}-core {platform.machine()} CPU"
    header = (f"torch {torch.__version__}, transformers {transformers}, Python {platform.python_version()}, {device}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    log(f"python: {sys.executable}", header)
    return header, cuda


def block(header, dry, results, budget, elapsed):
    mode = ("**Dry run** on the CPU at tiny sizes: the driver and every part's code path, not measurements."
            if dry else f"Real sizes on CUDA; budget {budget} s, {elapsed:.0f} s used.")
    lines = [header, "", mode, "", "| part | status | seconds (cap) |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} ({r['cap']}) |" for r in results]
    for r in results:
        lines += ["", f"### {r['name']}: {PARTS[r['name']][1] if r['name'] in PARTS else r['name']}", ""]
        lines += r["rows"] or ["(no rows)"]
        if r["status"] != "ok":
            lines += ["", r["status"]]                                 # 'FAILED: <one line>
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="every part at tiny size on the CPU; writes a copy of RESULTS.md in the output folder")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_SUITE_BUDGET", BUDGET)),
                    help=f"seconds for the whole suite, from GPU_SUITE_T0 if set (default {BUDGET})")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_suite"),
                    help="folder for gpu_suite.log, results.json and a copy of RESULTS.md (default: $OUT, else out/gpu_suite)")
    ap.add_argument("--results", default=None, help="the RESULTS.md to write (default: bench/RESULTS.md; dry run: "
                                                   "a copy of it in the output folder)")
    ap.add_argument("--moe-impl", choices=("fast", "grouped", "padded", "loop"), default=None,
                    help="the train part's moe.impl instead of the preset's 'fast' (e.g. padded, to measure STGC "
                         "where the grouped kernel fails)")
    ap.add_argument("--list", action="store_true", help="print the parts and their time caps, and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.dry_run)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; the parts are {list(PARTS)}")
    if args.list:
        for p in parts:
            print(f"{p:9s} {PARTS[p][0]:4d} s  {PARTS[p][1]}")
        return 0

    t0 = float(os.environ.get("GPU_SUITE_T0", time.time()))
    deadline = t0 + args.budget
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_suite.log"))
    log(f"=== gpu_suite {time.strftime('%Y-%m-%d %H:%M:%S')}: parts {parts}, budget {args.budget:.0f} s "
        f"({time.time() - t0:.0f} s already used by setup)")
    header, cuda = environment(log)
    dry = args.dry_run or not cuda
    if dry and not args.dry_run:
        log("No CUDA device: running the dry run (tiny sizes on the CPU) instead.")
    results_md = args.results
    if results_md is None:
        results_md = os.path.join(args.out, "RESULTS.md") if dry else common.RESULTS
    if dry and os.path.abspath(results_md) == os.path.abspath(common.RESULTS):
        ap.error("a dry run never writes bench/RESULTS.md: give --results another path")
    if dry and not os.path.exists(results_md):
        shutil.copyfile(common.RESULTS, results_md)

    env = dict(os.environ, PYTHONUNBUFFERED="1", **({MOE_IMPL_ENV: args.moe_impl} if args.moe_impl else {}))
    scratch = tempfile.mkdtemp(prefix="gpu_suite_")   # the parts' rows files; the output folder holds 3 files only
    results = []
    for p in parts:
        left = deadline - time.time() - 5                             # 5 s to write the results at the end
        cap = min(DRY_CAP if dry else PARTS[p][0], left)
        log(f"=== part {p}: cap {cap:.0f} s ({left:.0f} s left in the budget)")
        if cap < 15:
            r = {"name": p, "status": "FAILED: not run, the suite's time budget was spent", "seconds": 0, "cap": 0, "rows": []}
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", p] + (["--dry-run"] if dry else [])
            r = run_part(p, cmd, cap, log, os.path.join(scratch, f"rows_{p}.jsonl"), env)
        log(f"=== part {p}: {r['status']} ({r['seconds']:.0f} s)")
        results.append(r)
        update_results(BLOCK, HEADING, block(header, dry, results, args.budget, time.time() - t0), results_md)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"header": header, "dry_run": dry, "results": results}, f, indent=1)
        if os.path.abspath(results_md) != os.path.abspath(os.path.join(args.out, "RESULTS.md")):
            shutil.copyfile(results_md, os.path.join(args.out, "RESULTS.md"))
    failed = [r["name"] for r in results if r["status"] != "ok"]
    log("", f"=== gpu_suite done in {time.time() - t0:.0f} s: {len(results) - len(failed)} of {len(results)} parts ok"
        + (f"; failed: {failed}" if failed else ""), f"rows written to {os.path.relpath(results_md, ROOT)} "
        f"(block {BLOCK}); log, results.json and RESULTS.md in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
