"""How many CPU threads the demo should use: one demo training step (configs/demo.toml's model, a micro-batch of
32 synthetic samples, train.py's own train_step) on 1 and on 2 threads, interleaved, for stage II (dense, the tower
trains) and stage III (MoE + STGC), on a quiet machine and with the cores shared.

"Shared" is made, not hoped for: --busy N starts N processes that spin on a core each for the whole measurement
(another user's job, a second agent, a browser). On 2 cores with one of them busy, a 2-thread OpenMP team waits at
every op for the thread whose core is taken (bench/common.py), which is what made a demo run take 43 min.

    .venv/bin/python bench/demo_threads.py              # quiet, then with 1 busy core; writes the demo_threads block
    .venv/bin/python bench/demo_threads.py --busy 0     # quiet only

demo.py's default thread count (demo.DEFAULT_THREADS) is chosen from this table; README cites it.
"""
import argparse
import multiprocessing
import os
import tempfile

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, time_interleaved, update_results
import train
from data import LlavaJsonDataset, Tokenizer, build_synthetic_dataset, collate
from demo import CONFIG, STAGES, data_overrides


def spin():
    while True:
        pass


def demo_step(data_dir: str, stage: str):
    """A zero-argument callable running one train_step of the demo's stage II or III, on fixed micro-batches."""
    overrides = data_overrides(data_dir) + [o for name, _, extra in STAGES if name == stage for o in extra
                                            if not o.startswith(("--init.", "--data.data_path"))]
    cfg = train.load_config(CONFIG, overrides)
    tok = Tokenizer.load(cfg.data.tokenizer_path, cfg.data.tokenizer_family)
    ds = LlavaJsonDataset(cfg.data, tok)
    torch.manual_seed(0)
    ctx = train.single_process_context(cfg, tok)
    B = cfg.train.micro_batch_size
    batch = collate([ds[i] for i in range(B)], tok.pad_id, "right", cfg.data.image_size)
    return lambda: train.train_step(ctx, [batch], 10, 1000)


def measure(steps: dict, repeats: int) -> dict:
    fns = {}
    for stage, fn in steps.items():
        for threads in (1, 2):
            fns[(stage, threads)] = (lambda fn=fn, t=threads: (torch.set_num_threads(t), fn()))
    return time_interleaved(fns, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=1, help="cores kept busy in the shared measurement (0: quiet only)")
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        build_synthetic_dataset(tmp, seed=0, n_train=64, n_val=8, n_test=8, image_size=48)
        steps = {"stage II (dense)": demo_step(tmp, "stage2"), "stage III (MoE + STGC)": demo_step(tmp, "stage3")}
        head = header(", demo-sized train_step (micro-batch 32)")
        rows = {}
        for busy in sorted({0, args.busy}):
            procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
            for pr in procs:
                pr.start()
            load = os.getloadavg()[0]
            rows[busy] = (measure(steps, args.repeats), load)
            for pr in procs:
                pr.terminate()
    lines = [head, "", "| cores busy with another job | load average | step | 1 thread | 2 threads | 2 threads / 1 |",
             "|---|---|---|---|---|---|"]
    for busy, (t, load) in rows.items():
        for stage in steps:
            one, two = t[(stage, 1)], t[(stage, 2)]
            lines.append(f"| {busy} | {load:.1f} | {stage} | {one * 1e3:.0f} ms | {two * 1e3:.0f} ms | {two / one:.2f}x |")
    block = "\n".join(lines)
    print(block)
    update_results("demo_threads", "Demo threads (bench/demo_threads.py)", block)


if __name__ == "__main__":
    main()
