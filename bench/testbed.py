"""
bench/testbed.py: a testbed where token gradient conflict exists by construction, and STGC's claim put to it.

STGC's claim is causal: a token whose gradient opposes its expert's mean hurts that expert's other tokens, and
pushing it elsewhere (the Conflict Elimination Loss) helps. On the demo's data nobody knows which tokens should go
elsewhere. Here we do: data.build_synthetic_dataset(variant="conflict") has four domains that ask the same
questions with the same answer words but name colours by incompatible rules, the domain visible only through a
marker word; the dial s sets on how many colours the rules differ. The ideal routing is one expert per domain.

    .venv/bin/python bench/experiment.py --testbed             # the grid below, about 30 min on 2 CPU cores
    .venv/bin/python bench/testbed.py --methods moe stgc_b0.5 --strengths 1 --seeds 0
    .venv/bin/python bench/testbed.py --quick --out /tmp/tb    # every stage in seconds (tests/test_testbed.py)

Stages, each in its own process, each cached in <out> by a key of everything that produced it (settings, data,
base, variant, strength, seed; the code's git state is recorded beside it, not keyed):
  data     one conflict set per strength (same scenes, questions and tokenizer; only the answers differ), and a
           cluster id per record (cluster.py: sentence-encoder embeddings of the instruction, K-means, k = E).
  base     a dense model from random weights on strength 0, where every domain names colours as they are:
           it learns to read the cells' colours (MoE-LLaVA's stage II, where upcycling starts from).
  runs     from the base, the same steps on the same samples at strength s, for each METHODS row, 3 seeds (seed =
           data order and router init): dense (all LLM weights), MoE with the aux loss only, MoE + STGC at
           beta in {0.01, 0.1, 0.5, 2}, the cluster router (MoCLE-style, cluster.ClusterRouter) and the oracle
           router (each domain's tokens to its own expert: the ideal routing, imposed).
Every MoE run measures its conflicts (STGC with beta = 0 where the CEL is off). Per run: per-domain accuracy
(teacher-forced, a turn is right when every answer token is), the conflict ratio and per-expert gradient
consistency over training (train.py's log), routing purity against the ideal routing, load variance, expert
loading per domain and per instruction cluster, and whether the conflicting pairs are the ones from the wrong
domain (conflict rate of an expert's minority-domain tokens vs its majority-domain tokens).
Writes <out>/results.json, <out>/table.md and (matplotlib) <out>/testbed.png; docs/testbed.md has the design.
"""
import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import cluster  # noqa: E402
import train  # noqa: E402
from data import (CONFLICT_DOMAINS, LlavaJsonDataset, Tokenizer, build_synthetic_dataset, collate,  # noqa: E402
                  domain_blind_ceiling)
from model import IGNORE_INDEX, LlavaModel  # noqa: E402
from moe import MoEConfig  # noqa: E402
from stgc import STGC, STGCConfig, find_conflicts  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "testbed.toml")
STRENGTHS = (0.0, 0.5, 1.0)
SEEDS = (0, 1, 2)


@dataclass
class Settings:
    """Everything of the testbed that is not the model (configs/testbed.toml) or a method (METHODS)."""
    data_seed: int = 0
    objects: tuple = (1, 1)            # shapes per scene: one, so the base learns to read in a few hundred steps
    n_train: int = 2000
    n_test: int = 400
    base_steps: int = 600              # dense from scratch at strength 0, batch 16, LLM + projector train
    base_lr: float = 1e-3
    steps: int = 150                   # each run, from the base, batch 16: 1.2 epochs of the train split
    lr: float = 5e-4
    batch: int = 16
    eval_samples: int = 400            # test records scored (all of them by default)
    conflict_samples: int = 64         # test records for the conflict-by-domain analysis (one LM-loss backward)
    encoder: str = ""                  # a local all-MiniLM-L6-v2 dir; "" = cluster.make_random_encoder's stand-in


QUICK = Settings(n_train=48, n_test=16, base_steps=3, steps=3, batch=8, eval_samples=16, conflict_samples=8)

# ---- the methods: train.py overrides on top of configs/testbed.toml, and who routes ---------------------------
# router: 'none' (dense), 'token' (the learned router of moe.py), 'cluster' (the instruction's K-means cluster),
# 'domain' (the true domain: the ideal routing). A new method is a row; ROUTING_LAB's rows join when moe.py has
# their keys (the routing objectives of issue 18), opt-in with --methods, outside the default 30-minute grid.
MOE = ["--train.stage=moe"]
MEASURE = ["--stgc.enabled=true", "--stgc.loss_weight=0.0"]          # conflicts measured, no CEL
HARD = ["--moe.top_k=1", "--moe.dropless=true"]                      # one expert per sample's group, no capacity
METHODS = {
    "dense": (["--train.stage=finetune"], "none"),
    "moe": (MOE + MEASURE, "token"),
    **{f"stgc_b{b:g}": (MOE + ["--stgc.enabled=true", f"--stgc.loss_weight={b}"], "token") for b in (0.01, 0.1, 0.5, 2)},
    "cluster": (MOE + MEASURE + HARD, "cluster"),
    "oracle": (MOE + MEASURE + HARD, "domain"),
}
DEFAULT_METHODS = list(METHODS)
# Opt-in: the same methods with the decoder's attention training too (MoE-LLaVA's stage III freezes it). At the
# answer position the domain arrives only through attention from the marker; the base, trained where the marker is
# irrelevant, does not carry it there (README: a linear probe of the MoE layers' input finds the domain at chance).
ATTENTION = ["--testbed.train_attention"]
METHODS |= {f"{name}+attn": (overrides + ATTENTION, router) for name, (overrides, router) in list(METHODS.items())
            if name != "dense"}
ROUTING_LAB = {   # name: (MoEConfig field that must exist, overrides); coefficients as configs/moe_llava_stablelm_*.toml
    "moe_zloss": ("z_loss_coef", ["--moe.z_loss_coef=0.001"]),
    "moe_seqaux": ("seq_aux_loss_coef", ["--moe.seq_aux_loss_coef=0.01"]),
    "moe_auxfree": ("expert_bias", ["--moe.expert_bias=true", "--moe.expert_bias_rate=0.001", "--moe.aux_loss_coef=0.0"]),
}
METHODS |= {name: (MOE + MEASURE + extra, "token") for name, (field, extra) in ROUTING_LAB.items()
            if field in MoEConfig.__dataclass_fields__}
COMMON = []                                                          # every run's own overrides, beside METHODS
# -----------------------------------------------------------------------------
# Data: a conflict set per strength, cluster ids per record


def data_dir(out, s):
    return os.path.join(out, "data", f"s{s:g}")


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def build_data(out, st: Settings, strengths) -> dict:
    """The conflict sets (rebuilt when built with other parameters) and the clusters; returns their fingerprints."""
    prints = {}
    for s in sorted(set(strengths) | {0.0}):
        d = data_dir(out, s)
        want = dict(seed=st.data_seed, n_train=st.n_train, n_val=0, n_test=st.n_test, variant="conflict",
                    conflict_strength=s, conflict_objects=tuple(st.objects))
        stamp = os.path.join(d, "built_with.json")
        if not (os.path.isfile(stamp) and json.load(open(stamp)) == json.loads(json.dumps(want))):
            shutil.rmtree(d, ignore_errors=True)
            build_synthetic_dataset(d, **want)
            with open(stamp, "w") as f:
                json.dump(want, f)
        prints[s] = fingerprint([want, file_hash(os.path.join(d, "train.json")), file_hash(os.path.join(d, "tokenizer.json"))])
    clusters = os.path.join(out, "clusters.json")
    want = {"data": prints[0.0], "encoder": st.encoder or "random", "k": num_experts()}
    if not (os.path.isfile(clusters) and json.load(open(clusters)).get("made_from") == want):
        make_clusters(out, st, want)
    return prints


def num_experts():
    return train.load_config(CONFIG).moe.num_experts


def make_clusters(out, st: Settings, made_from: dict):
    """K-means on the train split's instruction embeddings (k = E), the test split assigned to the nearest centre.
    The instructions are the same at every strength (only answers change), so strength 0's serve all."""
    d = data_dir(out, 0.0)
    recs = {s: json.load(open(os.path.join(d, f"{s}.json"))) for s in ("train", "test")}
    path = st.encoder or cluster.make_random_encoder(os.path.join(out, "encoder"),
                                                     sorted({cluster.instruction(r) for r in recs["train"]}))
    enc = cluster.SentenceEncoder(path)
    x = {s: cluster.embed_records(r, enc) for s, r in recs.items()}
    labels, centres, inertia = cluster.kmeans(x["train"], made_from["k"], seed=0)
    result = {"made_from": made_from, "encoder": path, "inertia": inertia,
              "train": labels.tolist(), "test": cluster.assign(x["test"], centres).tolist()}
    result["agreement_with_domain"] = {s: cluster.agreement(result[s], [r["domain"] for r in recs[s]]) for s in recs}
    with open(os.path.join(out, "clusters.json"), "w") as f:
        json.dump(result, f)


class Split:
    """One split in memory (images decoded once): samples, domain index and cluster id per sample."""

    def __init__(self, folder, split, tok, cfg, clusters: list):
        dcfg = replace(cfg.data, data_path=os.path.join(folder, f"{split}.json"), image_folder=os.path.join(folder, "images"))
        ds = LlavaJsonDataset(dcfg, tok)
        self.samples = [ds[k] for k in range(len(ds))]
        if len(ds) != len(ds.records) or any(not isinstance(s, dict) for s in self.samples):
            raise RuntimeError(f"{folder}/{split}.json: records were skipped:\n{ds.report()}")
        self.domain = torch.tensor([r["domain_index"] for r in ds.records])
        self.cluster = torch.tensor(clusters)
        self.pad_id, self.image_size = tok.pad_id, dcfg.image_size

    def __len__(self):
        return len(self.samples)

    def batch(self, idx) -> dict:
        mb = collate([self.samples[i] for i in idx], self.pad_id, "right", self.image_size)
        return mb | {"domain": self.domain[idx], "cluster": self.cluster[idx]}


def load_splits(out, s, cfg, splits=("train", "test")):
    folder = data_dir(out, s)
    tok = Tokenizer.load(os.path.join(folder, "tokenizer.json"), cfg.data.tokenizer_family)
    clusters = json.load(open(os.path.join(out, "clusters.json")))
    return tok, {sp: Split(folder, sp, tok, cfg, clusters[sp]) for sp in splits}

# -----------------------------------------------------------------------------
# Training: train.py's own step (the whole objective: LM + alpha * aux + beta * CEL), on in-memory batches


def train_loop(model, cfg, split: Split, steps, seed, log_path=None, routers=(), group_key=None, desc="train",
               train_attention=False):
    train.set_trainable(model, cfg.train)
    for name, p in model.lm.named_parameters() if train_attention else ():
        if ".attn." in name or ".attn_norm." in name:                 # every block's attention and its norm
            p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(train.param_groups(model, cfg.train), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas))
    stgc = STGC(cfg.stgc) if cfg.stgc.enabled and cfg.train.stage in ("moe", "mole") else None
    ctx = train.Context(cfg=cfg, model=model, raw=model, optimizer=optimizer, sampler=None, rank=0, world=1,
                        device=torch.device("cpu"), extra_config={}, stgc=stgc)
    g = torch.Generator().manual_seed(seed)
    order, rows = [], []
    log = open(log_path, "w") if log_path else None
    for step in tqdm(range(steps), desc=desc, leave=False):
        if len(order) < cfg.train.micro_batch_size:                   # epochs of seeded permutations
            order += torch.randperm(len(split), generator=g).tolist()
        idx, order = order[:cfg.train.micro_batch_size], order[cfg.train.micro_batch_size:]
        mb = split.batch(idx)
        if routers:
            cluster.set_groups(routers, mb[group_key])
        row = train.train_step(ctx, [mb], step, steps)
        rows.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
    if log:
        log.close()
    model.eval()
    return rows

# -----------------------------------------------------------------------------
# Measurements


class Capture:
    """The spliced labels the LM receives and the logits of its supervised positions (LanguageModel.forward puts
    only those through lm_head): what teacher-forced accuracy needs, whatever the splice does before."""

    def __init__(self, model):
        self.hooks = [model.lm.register_forward_pre_hook(self._pre, with_kwargs=True),
                      model.lm.lm_head.register_forward_hook(self._head)]

    def _pre(self, module, args, kwargs):
        self.labels, self.mask = kwargs["labels"], kwargs["attention_mask"]    # [B, T'], [B, T']

    def _head(self, module, args, out):
        self.logits = out                                              # [n, V] at targets != IGNORE, row-major

    def remove(self):
        for h in self.hooks:
            h.remove()


def ideal_purity(n_DE) -> float:
    """Share of tokens routed as the ideal routing says, up to naming the experts: the best one-to-one match of
    domains to experts, max over injective maps pi of sum_d n[d, pi(d)] / N (D <= E)."""
    D, E = n_DE.shape
    total = float(n_DE.sum())
    if total == 0:
        return None
    return max(sum(float(n_DE[d, e]) for d, e in enumerate(p)) for p in itertools.permutations(range(E), D)) / total


@torch.no_grad()
def evaluate(model, split: Split, n, batch, routers=(), group_key=None) -> dict:
    """Per-domain accuracy (per answer turn); per MoE layer: first-choice counts by domain at the positions that
    predict an answer token (-> purity), by cluster over all real tokens, and the experts' load over real tokens."""
    model.eval()
    cap = Capture(model)
    D, k = len(CONFLICT_DOMAINS), int(split.cluster.max()) + 1
    right, turns = torch.zeros(D), torch.zeros(D)
    by_domain = by_cluster = load = None
    try:
        for start in range(0, min(n, len(split)), batch):
            idx = list(range(start, min(n, len(split), start + batch)))
            mb = split.batch(idx)
            if routers:
                cluster.set_groups(routers, mb[group_key])
            out = model(mb["input_ids"], mb["images"], labels=mb["labels"], attention_mask=mb["attention_mask"])
            targets = cap.labels[:, 1:]                                # position t predicts token t + 1
            keep = targets != IGNORE_INDEX                             # [B, T'-1]
            ok = torch.zeros_like(keep)
            ok[keep] = cap.logits.argmax(-1) == targets[keep]
            for b in range(len(idx)):                                  # a turn = a run of supervised targets
                t = keep[b].nonzero().flatten().tolist()
                runs = [list(g) for _, g in itertools.groupby(enumerate(t), lambda x: x[1] - x[0])]
                d = int(mb["domain"][b])
                for r in runs:
                    turns[d] += 1
                    right[d] += bool(all(ok[b, p] for _, p in r))
            B, T = cap.mask.shape
            answer_S = torch.cat([keep, keep.new_zeros(B, 1)], 1).reshape(-1)   # [B*T'] predicts an answer token
            real_S = cap.mask.bool().reshape(-1)
            dom_S, clu_S = mb["domain"].repeat_interleave(T), mb["cluster"].repeat_interleave(T)
            if out.routing:
                E = out.routing[0].router_logits.shape[1]
                if by_domain is None:
                    L = len(out.routing)
                    by_domain, by_cluster, load = torch.zeros(L, D, E), torch.zeros(L, k, E), torch.zeros(L, E)
                for j, r in enumerate(out.routing):
                    first_S, kept_S = r.experts[:, 0], r.kept[:, 0]
                    m = answer_S & kept_S
                    by_domain[j].index_put_((dom_S[m], first_S[m]), torch.ones(int(m.sum())), accumulate=True)
                    m = real_S & kept_S
                    by_cluster[j].index_put_((clu_S[m], first_S[m]), torch.ones(int(m.sum())), accumulate=True)
                    load[j] += torch.bincount(first_S[m], minlength=E).float()
    finally:
        cap.remove()
    acc = {d: float(right[i] / turns[i]) if turns[i] else None for i, d in enumerate(CONFLICT_DOMAINS)}
    result = {"accuracy": acc, "mean_accuracy": float(right.sum() / turns.sum().clamp_min(1)), "turns": int(turns.sum())}
    if by_domain is not None:
        shares = load / load.sum(1, keepdim=True).clamp_min(1)         # [L, E]
        result |= {"purity": [ideal_purity(n) for n in by_domain], "load_share": shares.tolist(),
                   "load_variance": [float(s.var(unbiased=False)) for s in shares],
                   "loading_by_domain": (by_domain / by_domain.sum(2, keepdim=True).clamp_min(1)).tolist(),
                   "loading_by_cluster": (by_cluster / by_cluster.sum(2, keepdim=True).clamp_min(1)).tolist()}
    return result


def answer_gradients(model, batch, layer: int, first_only: bool = False):
    """[N, D] the LM loss's gradient at decoder layer `layer`'s MLP output (a dense FFN, or an MoE layer's combined
    output), at the positions that predict an answer token, and [N] their samples' domains; first_only: one row per
    sample, the position that predicts its first answer token. For a dense FFN this is STGC's 'bias' proxy of the
    token's gradient on that shared expert (stgc.py); its mean is the expert's mean."""
    cap, keep_out = Capture(model), {}
    mlp = model.lm.layers[layer].mlp

    def hook(module, args, out):
        y = out[0] if isinstance(out, tuple) else out
        y.retain_grad()
        keep_out["y"] = y

    h = mlp.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            out = model(batch["input_ids"], batch["images"], labels=batch["labels"], attention_mask=batch["attention_mask"])
            out.loss.backward()
        y = keep_out["y"]
        B, T = cap.mask.shape
        keep = torch.cat([cap.labels[:, 1:] != IGNORE_INDEX, cap.labels.new_zeros(B, 1, dtype=torch.bool)], 1)   # [B, T']
        if first_only:
            keep = keep & (keep.cumsum(1) == 1)
        g = y.grad.reshape(B, T, -1)[keep]                             # [N, D]
        dom = batch["domain"][:, None].expand(B, T)[keep]
    finally:
        h.remove()
        cap.remove()
        model.zero_grad(set_to_none=True)
    return g, dom


def domain_split(g_ND, dom_N) -> dict:
    """Pairwise cosines of per-token gradients, same-domain pairs vs cross-domain pairs (self-pairs excluded), and
    each token's cosine to the mean of all (the shared expert's mean, as STGC computes it) by domain."""
    u = torch.nn.functional.normalize(g_ND.double(), dim=-1)
    cos = u @ u.T
    same = dom_N[:, None] == dom_N[None, :]
    off = ~torch.eye(len(dom_N), dtype=torch.bool)
    mean = torch.nn.functional.cosine_similarity(g_ND.double(), g_ND.double().mean(0, keepdim=True), dim=-1)
    return {"within": float(cos[same & off].mean()), "across": float(cos[~same].mean()),
            "to_expert_mean": float(mean.mean()), "conflict_ratio": float((mean < 0).double().mean())}


def conflict_by_domain(model, split: Split, n, routers=(), group_key=None) -> dict:
    """Does STGC's test flag the tokens that should be elsewhere? On n test records: STGC's conflicts (paper
    defaults: bias gradients of the LM loss, tau = 0, evaluation routing, as eval.conflict_statistics) at the answer
    positions; each expert's majority domain among its pairs there; the conflict rate of majority-domain pairs and of
    the others. A detector that finds the wrong-domain tokens flags the minority more."""
    mb = split.batch(list(range(min(n, len(split)))))
    if routers:
        cluster.set_groups(routers, mb[group_key])
    cap = Capture(model)
    try:
        with torch.enable_grad():
            out = model(mb["input_ids"], mb["images"], labels=mb["labels"], attention_mask=mb["attention_mask"])
            if not out.routing:
                return {}
            deltas = torch.autograd.grad(out.loss, [r.output for r in out.routing], allow_unused=True)
    finally:
        cap.remove()
    B, T = cap.mask.shape
    answer_S = torch.cat([cap.labels[:, 1:] != IGNORE_INDEX, cap.labels.new_zeros(B, 1, dtype=torch.bool)], 1).reshape(-1)
    dom_S = mb["domain"].repeat_interleave(T)
    rows = []
    for r, d in zip(out.routing, deltas):
        d = torch.zeros_like(r.output) if d is None else d
        c = find_conflicts(r, d.reshape(-1, d.shape[-1]), STGCConfig())
        m = c.pair & answer_S[c.token]
        tok, exp, conf = c.token[m], c.expert[m], c.conflict[m]
        dom = dom_S[tok]
        E, D = r.router_logits.shape[1], len(CONFLICT_DOMAINS)
        counts = torch.zeros(E, D).index_put_((exp, dom), torch.ones(len(exp)), accumulate=True)
        majority = (dom == counts.argmax(1)[exp]) & (counts.sum(1)[exp] > 0)
        rate = lambda sel: float(conf[sel].float().mean()) if sel.any() else None   # noqa: E731
        rows.append({"layer": r.layer, "pairs": int(m.sum()), "conflict_ratio": rate(torch.ones_like(conf)),
                     "majority_share": float(majority.float().mean()) if len(majority) else None,
                     "conflict_majority": rate(majority), "conflict_minority": rate(~majority)})
    return {"layers": rows}


def conflict_curve(rows) -> dict:
    """Per step, mean over MoE layers: conflict ratio, mean cosine, and per layer the per-expert consistency."""
    rows = [r for r in rows if r.get("stgc")]
    return {"step": [r["step"] for r in rows],
            "conflict_ratio": [statistics.fmean(x["conflict_ratio"] for x in r["stgc"]) for r in rows],
            "mean_cos": [statistics.fmean(x["mean_cos"] for x in r["stgc"]) for r in rows],
            "consistency": [[x["consistency"] for x in r["stgc"]] for r in rows]}

# -----------------------------------------------------------------------------
# One process per stage: the base, and one (method, strength, seed)


def base_dir(out):
    return os.path.join(out, "base")


def base_key(st: Settings, prints) -> str:
    return fingerprint({"settings": asdict(st), "data": prints[0.0], "config": open(CONFIG).read()})


def make_base(out, st: Settings, key: str):
    cfg = train.load_config(CONFIG, [f"--train.lr={st.base_lr}", f"--train.global_batch_size={st.batch}",
                                     f"--train.micro_batch_size={st.batch}"])
    tok, splits = load_splits(out, 0.0, cfg)
    torch.manual_seed(0)
    model = train.build_model(cfg, tok.vocab_size)
    t0 = time.perf_counter()
    rows = train_loop(model, cfg, splits["train"], st.base_steps, seed=0, log_path=os.path.join(out, "base.log.jsonl"),
                      desc="base")
    ev = evaluate(model, splits["test"], st.eval_samples, 64)
    tmp = base_dir(out) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, {"testbed_key": key, "eval_strength0": ev, "seconds": time.perf_counter() - t0,
                                "final_lm_loss": rows[-1]["lm_loss"]})
    shutil.rmtree(base_dir(out), ignore_errors=True)
    os.replace(tmp, base_dir(out))
    print(f"testbed base: strength-0 accuracy {ev['mean_accuracy']:.1%} after {st.base_steps} steps")


def run_name(method, s, seed):
    return f"{method}_s{s:g}_seed{seed}"


def run_key(st, prints, base, method, s, seed) -> str:
    return fingerprint({"settings": asdict(st), "data": prints[s], "base": base, "method": METHODS[method],
                        "common": COMMON, "strength": s, "seed": seed, "config": open(CONFIG).read()})


def run_one(out, st: Settings, method, s, seed, key) -> dict:
    overrides, router = METHODS[method]
    train_attention = ATTENTION[0] in overrides                       # ours, not a train.py key
    overrides = [o for o in overrides if o not in ATTENTION]
    cfg = train.load_config(CONFIG, COMMON + overrides + [f"--train.lr={st.lr}", f"--train.seed={seed}",
                                                          f"--train.global_batch_size={st.batch}",
                                                          f"--train.micro_batch_size={st.batch}"])
    tok, splits = load_splits(out, s, cfg)
    t0 = time.perf_counter()
    model = LlavaModel.from_pretrained(base_dir(out))
    torch.manual_seed(seed)                                            # the routers' init
    if cfg.train.stage == "moe":
        model.lm.install_moe(cfg.moe)                                  # upcycling: experts = copies of the FFN
    routers = cluster.install_cluster_routers(model) if router in ("cluster", "domain") else ()
    group = {"cluster": "cluster", "domain": "domain"}.get(router)
    folder = os.path.join(out, "runs", run_name(method, s, seed))
    os.makedirs(folder, exist_ok=True)
    rows = train_loop(model, cfg, splits["train"], st.steps, seed, os.path.join(folder, "log.jsonl"), routers, group,
                      desc=run_name(method, s, seed), train_attention=train_attention)
    summary = {"method": method, "strength": s, "seed": seed, "key": key, "router": router,
               "ceiling": domain_blind_ceiling(s), "train_seconds": time.perf_counter() - t0,
               **evaluate(model, splits["test"], st.eval_samples, 64, routers, group),
               "conflicts_by_domain": conflict_by_domain(model, splits["test"], st.conflict_samples, routers, group),
               "curve": conflict_curve(rows), "final_lm_loss": rows[-1]["lm_loss"],
               "seconds": time.perf_counter() - t0, "loadavg": os.getloadavg()[0], "provenance": provenance()}
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def provenance() -> dict:
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    return {"git_head": head, "files": {f: file_hash(os.path.join(ROOT, f)) for f in
                                        ("model.py", "moe.py", "stgc.py", "train.py", "data.py", "cluster.py", "bench/testbed.py")}}


def cached(path, key):
    if os.path.isfile(path):
        with open(path) as f:
            d = json.load(f)
        if d.get("key", d.get("testbed_key")) == key:
            return d
    return None

# -----------------------------------------------------------------------------
# Table and figure


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def late(curve, key="conflict_ratio"):
    c = curve[key]
    return statistics.fmean(c[len(c) * 3 // 4:]) if c else None


def consistency(curve):
    """Per-expert gradient consistency late in training: mean over the last 25% of steps, layers and experts
    (each expert's mean cosine of its pairs to its mean), and the lowest expert's."""
    c = curve["consistency"][len(curve["consistency"]) * 3 // 4:]
    if not c:
        return None, None
    per_expert = [statistics.fmean(step[j][e] for step in c) for j in range(len(c[0])) for e in range(len(c[0][0]))]
    return statistics.fmean(per_expert), min(per_expert)


def minority_gap(s):
    """Conflict rate of minority-domain pairs minus majority-domain pairs, mean over layers."""
    rows = s.get("conflicts_by_domain", {}).get("layers", [])
    gaps = [r["conflict_minority"] - r["conflict_majority"] for r in rows
            if r["conflict_minority"] is not None and r["conflict_majority"] is not None]
    return statistics.fmean(gaps) if gaps else None


METRICS = {   # column: (header, per-run value, format)
    "acc": ("accuracy %", lambda s: 100 * s["mean_accuracy"], "{:.1f}"),
    **{d: (d, (lambda s, d=d: 100 * s["accuracy"][d] if s["accuracy"][d] is not None else None), "{:.0f}") for d in CONFLICT_DOMAINS},
    "purity": ("purity", lambda s: statistics.fmean(s["purity"]) if s.get("purity") else None, "{:.2f}"),
    "conflict": ("conflict ratio (late)", lambda s: late(s["curve"]), "{:.1%}"),
    "consistency": ("expert consistency", lambda s: consistency(s["curve"])[0], "{:.3f}"),
    "load_var": ("load variance", lambda s: statistics.fmean(s["load_variance"]) if s.get("load_variance") else None, "{:.4f}"),
    "gap": ("minority - majority conflict rate", minority_gap, "{:+.2f}"),
}


def table(runs: list, methods, strengths) -> str:
    cols = list(METRICS)
    lines = ["| method | s | ceiling | " + " | ".join(METRICS[c][0] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    for m in methods:
        for s in strengths:
            group = [r for r in runs if r["method"] == m and r["strength"] == s]
            if not group:
                continue
            cells = []
            for c in cols:
                mu, sd = mean_std([METRICS[c][1](r) for r in group])
                fmt = METRICS[c][2]
                cells.append("-" if mu is None else fmt.format(mu) + ("" if c in CONFLICT_DOMAINS else " ± " + fmt.format(sd).lstrip("+")))
            lines.append(f"| {m} (n={len(group)}) | {s:g} | {100 * domain_blind_ceiling(s):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs: list, methods, strengths, path) -> str | None:
    """Purity and accuracy vs conflict strength, one line per method (mean over seeds, min-max shaded); the
    domain-blind ceiling dashed on the accuracy panel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("testbed: matplotlib not installed, no figure (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("purity", "routing purity vs the ideal routing\n(answer positions, mean over MoE layers)"),
              ("acc", "accuracy % (per answer turn)"), ("conflict", "conflict ratio, last 25% of steps"))
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}          # one colour per method in every panel
    for ax, (key, title) in zip(axes, panels):
        for m in methods:
            xs, mu, lo, hi = [], [], [], []
            for s in strengths:
                vals = [v for v in (METRICS[key][1](r) for r in runs if r["method"] == m and r["strength"] == s) if v is not None]
                if vals:
                    xs.append(s), mu.append(statistics.fmean(vals)), lo.append(min(vals)), hi.append(max(vals))
            if xs:
                ax.plot(xs, mu, marker="o", ms=3, label=m, color=colour[m], ls="--" if m.endswith("+attn") else "-")
                ax.fill_between(xs, lo, hi, color=colour[m], alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("conflict strength s")
    axes[1].plot(strengths, [100 * domain_blind_ceiling(s) for s in strengths], "k--", lw=1, label="domain-blind ceiling")
    axes[0].axhline(0.25, color="grey", lw=0.8, ls=":")                # 4 domains on 4 experts by chance (uniform)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

# -----------------------------------------------------------------------------


def in_own_process(fn, *args):
    """Run fn(*args) in a forked child and wait for it: a fresh process per stage (memory stays flat over the grid,
    a run's time does not depend on the runs before it), without paying the ~3-6 s of importing torch and
    torchvision again per run (72 runs: 4-7 minutes on the shared cores). The parent has run no torch op on
    more than one thread, so the fork is safe."""
    import multiprocessing
    child = multiprocessing.get_context("fork").Process(target=fn, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"testbed: {getattr(fn, '__name__', fn)}{args[2:]} failed (exit code {child.exitcode})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", default="out/testbed")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--strengths", nargs="+", type=float, default=list(STRENGTHS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps: checks every stage in seconds")
    p.add_argument("--encoder", default="", help="a local all-MiniLM-L6-v2 dir for the clusters (default: a random stand-in)")
    p.add_argument("--figures", default="", help="also copy the figure and table here (e.g. bench/figures)")
    args = p.parse_args(argv)
    st = replace(QUICK if args.quick else Settings(), encoder=args.encoder)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))   # bench/common.py: 1 thread on the shared cores
    os.makedirs(args.out, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    prints = build_data(args.out, st, args.strengths)
    bkey = base_key(st, prints)
    if cached(os.path.join(base_dir(args.out), "config.json"), bkey) is None:
        in_own_process(make_base, args.out, st, bkey)
    runs = []
    grid = [(m, s, seed) for s in args.strengths for m in args.methods for seed in args.seeds]
    for m, s, seed in tqdm(grid, desc="testbed", unit="run"):
        key = run_key(st, prints, bkey, m, s, seed)
        path = os.path.join(args.out, "runs", run_name(m, s, seed), "summary.json")
        if cached(path, key) is None:
            in_own_process(run_one, args.out, st, m, s, seed, key)
        runs.append(cached(path, key))
    base = json.load(open(os.path.join(base_dir(args.out), "config.json")))
    clusters = json.load(open(os.path.join(args.out, "clusters.json")))
    header = (f"torch {torch.__version__}, {os.cpu_count()}-core CPU, 1 thread per run, load average {load0:.1f} at start, "
              f"{os.getloadavg()[0]:.1f} at the end; {len(grid)} runs + base in {time.perf_counter() - t0:.0f} s "
              f"(cached stages not re-run); base: strength-0 accuracy {base['eval_strength0']['mean_accuracy']:.1%} after "
              f"{st.base_steps} steps; runs: {st.steps} steps of {st.batch}; clusters vs domains (test): "
              f"NMI {clusters['agreement_with_domain']['test']['nmi']:.3f}, purity {clusters['agreement_with_domain']['test']['purity']:.2f}")
    text = header + "\n\n" + table(runs, args.methods, sorted(args.strengths))
    results = {"settings": asdict(st), "header": header, "base": base["eval_strength0"],
               "clusters": clusters["agreement_with_domain"], "runs": runs}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    fig = figure(runs, args.methods, sorted(args.strengths), os.path.join(args.out, "testbed.png"))
    if args.figures:
        os.makedirs(args.figures, exist_ok=True)
        for f in [fig, os.path.join(args.out, "table.md")]:
            if f:
                shutil.copy(f, os.path.join(args.figures, "testbed" + os.path.splitext(f)[1]))
    print(f"testbed: {args.out}/results.json, table.md" + (", testbed.png" if fig else ""))
    return results


if __name__ == "__main__":
    main()
