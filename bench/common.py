"""What every bench script shares: the line naming the machine, interleaved timing with a median, and
writing the script's generated block into bench/RESULTS.md.

Timing rule (RESULTS.md): the variants being compared run in turns inside one process, round after round,
and each is summarised by its median. A shared machine (another job on the 2 dev cores, GPU clocks) then
slows every variant alike, so the ratios stay meaningful even when the absolute times drift.

CPU threads: the scripts run torch on 1 thread unless BENCH_THREADS says otherwise. The dev machine's 2
cores are shared with other jobs; a 2-thread OpenMP team whose second thread is preempted makes every
small op wait for it, which inflates the many-small-ops paths (decoding, the expert loop) far more than the
big matmuls: one run of eval_throughput.py took 13 min instead of ~1 and reported transformers 2.3x faster
than ours, against 1.0x on one thread. The header records the thread count and the load average.
"""
import os
import platform
import re
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:                       # the bench scripts import model.py, moe.py, ... from the root
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"dev machine: {os.cpu_count()}-core {platform.machine()} CPU"


def set_cpu_threads() -> int:
    """Called by each script's main (not at import: tests import the scripts and keep their own threads)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    return torch.get_num_threads()


def header(extra: str = "") -> str:
    """'torch 2.14.1, <machine>, 1 CPU thread(s), load average 2.0, 2026-11-25' (+ extra): the first line
    of every generated block."""
    cpu = f"{torch.get_num_threads()} CPU thread(s), load average {os.getloadavg()[0]:.1f} at start"
    return f"torch {torch.__version__}{extra}, {machine()}, {cpu}, {time.strftime('%Y-%m-%d')}"


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, repeats: int, device="cpu", warmup: int = 1) -> dict:
    """Median seconds of each fn (name -> zero-argument callable). Each round calls every fn once, in
    order; the first `warmup` rounds (allocator, autotuning, lazy init) are discarded."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def update_results(key: str, heading: str, block: str, path: str = RESULTS) -> None:
    """Put `block` between the markers <!-- begin KEY --> / <!-- end KEY --> of RESULTS.md, replacing what
    was there; the hand-written text around the markers is kept. A script run for the first time appends
    '## heading' and the markers at the end."""
    text = open(path).read() if os.path.isfile(path) else "# Benchmark results\n"
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    new = f"{begin}\n{block.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{new}\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"\n(updated the {key} block of {os.path.relpath(path)})")
