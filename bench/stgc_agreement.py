"""How far STGC's fast path and the paper's two-pass reference agree when there are several MoE layers.

The two differ by definition (stgc.py, "Convention"): the reference finds conflicts from the LM-loss gradient
at each MoE layer's output (the paper's pass 1); the fast path from the gradient of the whole objective arriving
there in the one backward, which at a shallower MoE layer also holds the deeper layers' alpha * aux and
beta * CEL gradients. With one MoE layer, or alpha = beta = 0, they are identical (tests/test_stgc.py). Here:
a 4-layer decoder with an MoE at every layer (E=4, top-2), random weights, random token batches whose second
half is supervised; for each beta, the share of (token, expert) pairs whose conflict label differs between the
two, per MoE layer (deepest first: it sees no deeper layer, so it must agree exactly), over several batches.

    .venv/bin/python bench/stgc_agreement.py          # about a minute on the 2-core CPU

Writes its table into bench/RESULTS.md (the `stgc_agreement` block).
"""
import argparse

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
from common import header, set_cpu_threads, update_results
from model import LanguageModel, LMConfig
from moe import MoEConfig
from stgc import STGC, STGCConfig

ALPHA = 0.01


def tiny_moe_lm(seed):
    cfg = LMConfig(family="stablelm", vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=4, num_heads=4,
                   norm="layernorm", qkv_bias=True, partial_rotary_factor=0.25,
                   moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=1.5, layers="dense"))
    torch.manual_seed(seed)
    return LanguageModel(cfg).train()


def random_batch(seed, B=4, T=32, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :T // 2] = -100                                          # an unsupervised prompt
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def stgc_step(lm, batch, cfg: STGCConfig) -> STGC:
    """One training step's forward and backward with STGC (as train.py's objective: LM + alpha aux + CEL); the
    returned STGC holds the conflicts it found, lm's .grad the step's gradients (tests/test_stgc.py uses it too)."""
    lm.zero_grad()
    stgc = STGC(cfg)
    if cfg.impl == "reference":
        found = stgc.reference_conflicts(lambda: lm(**batch))
        out = lm(**batch)
        loss = out.loss + ALPHA * out.aux_loss + stgc.cel(out.routing, found)
    else:
        out = lm(**batch)
        stgc.attach(out.routing)
        loss = out.loss + ALPHA * out.aux_loss
    loss.backward()
    return stgc


def disagreement(betas, seeds, source="bias"):
    """{beta: [per MoE layer: (differing pairs, pairs, conflicts in the reference)]}, summed over seeds."""
    out = {}
    for beta in betas:
        rows = None
        for seed in seeds:
            lm, batch = tiny_moe_lm(seed), random_batch(seed)
            ref = stgc_step(lm, batch, STGCConfig(enabled=True, impl="reference", grad_source=source, loss_weight=beta)).conflicts
            fast = stgc_step(lm, batch, STGCConfig(enabled=True, impl="fast", grad_source=source, loss_weight=beta)).conflicts
            counts = [(int((r.conflict != f.conflict)[r.pair].sum()), int(r.pair.sum()), int(r.conflict.sum()))
                      for r, f in zip(ref, fast)]
            assert all(torch.equal(r.pair, f.pair) for r, f in zip(ref, fast))
            rows = counts if rows is None else [tuple(a + b for a, b in zip(x, y)) for x, y in zip(rows, counts)]
        out[beta] = rows
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--seeds", type=int, default=32, help="random models x batches per beta")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    set_cpu_threads()
    betas = (0.0, 0.01, 0.5)
    result = disagreement(betas, range(args.seeds))
    lines = [header(), "", f"4-layer decoder, MoE at every layer (E=4, top-2, cf 1.5), D=64, random weights, {args.seeds} "
             f"batches of 4 x 32 tokens (second half supervised), alpha = {ALPHA}, grad_source = bias, tau = 0. Cells: "
             "pairs whose conflict label differs between fast and reference / pairs (their share); the reference's "
             "conflict ratio in brackets.", "",
             "| beta | " + " | ".join(f"layer {i}" for i in range(4)) + " | all layers |", "|---" * 6 + "|"]
    for beta, rows in result.items():
        cells = [f"{d} / {n} ({d / max(n, 1):.1%}) [{c / max(n, 1):.0%}]" for d, n, c in rows]
        d, n = sum(r[0] for r in rows), sum(r[1] for r in rows)
        lines.append(f"| {beta} | " + " | ".join(cells) + f" | {d / max(n, 1):.1%} |")
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        update_results("stgc_agreement", "STGC fast vs reference with several MoE layers (`bench/stgc_agreement.py`)", block)
        print("\n(updated the stgc_agreement block of bench/RESULTS.md)")
    return result


if __name__ == "__main__":
    main()
