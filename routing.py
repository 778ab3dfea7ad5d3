"""
routing.py: what the routers did, measured. The training log's per-layer routing statistics (train.py's
train_step) and eval's routing analysis (eval.py) both come from here, so a number means the same in both.
Definitions, their sources and what is our choice: docs/routing.md.

  token_kinds      each position of the spliced sequence: 0 image feature, 1 prompt text, 2 answer (supervised), -1 pad
  layer_sums       one MoE layer's additive counts for a forward (real tokens only): tokens, the sum of the per-token
                   router entropy, each expert's load (token-expert assignments, all K choices, before capacity), and
                   the co-activation counts (how often experts i < j are a token's first two choices); they add up over
                   micro-batches and ranks, and `layer_stats` turns them into the logged numbers:
    entropy          mean over tokens of H(softmax(z)) in nats (log E: a uniform router, 0: a one-hot one)
    load             each expert's share of the assignments
    load_var         the variance over experts of those shares (GAR's LVar; 0 when balanced)
    utilisation      exp(H(load)) / E, the effective share of experts in use (1 balanced, 1/E one expert; our
                     definition: GAR's "Util" is not defined in what we have of it)
    coactivation     the expert pairs (i, j) that are some token's top two, with their share of the tokens, most first
  pathway_counts   activated pathways (STGC paper Fig. 5): each token's sequence of first-choice experts across the
                   MoE layers, counted
  purity_nmi       expert-domain specialisation from a [domains, experts] count table: cluster purity and the
                   normalised mutual information (GAR §5's measures; arithmetic-mean normalisation, as scikit-learn's)

Suffixes: S tokens, E experts, K = top_k, L MoE layers, D domains.
"""
import math
from collections import Counter

import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

KINDS = ("image", "text", "answer")   # prompt image features, prompt text tokens, answer (supervised / generated) tokens


def token_kinds(input_ids, labels, attention_mask, num_features: int) -> torch.Tensor:
    """[B, T'] kind of every position after LlavaModel.splice (each <image> placeholder becomes num_features image
    positions, the batch right-padded again with -1): what eval.prompt_kinds gives per sample, for a batch, on the
    host (the ids are there before they go to the device)."""
    rows = []
    for ids, lab, m in zip(input_ids, labels, attention_mask.bool()):
        ids, lab = ids[m], lab[m]
        image = ids == IMAGE_TOKEN_INDEX
        kind = torch.where(image, 0, torch.where(lab != IGNORE_INDEX, 2, 1))
        rows.append(kind.repeat_interleave(torch.where(image, num_features, 1)))
    T = max((len(r) for r in rows), default=0)
    return torch.stack([F.pad(r, (0, T - len(r)), value=-1) for r in rows]) if rows else torch.zeros(0, 0, dtype=torch.long)

# -----------------------------------------------------------------------------
# Per-layer counts: additive, on the device, one host sync per step (train.py) or per benchmark (eval.py)


def sums_width(E: int) -> int:
    return 2 + E + E * E


def real_tokens(record) -> torch.Tensor:
    """[S] float 1 for a real token, 0 for padding."""
    S = record.experts.shape[0]
    return record.valid.float() if record.valid is not None else record.experts.new_ones(S, dtype=torch.float32)


def coactivation_counts(experts_SK, weight_S, E: int) -> torch.Tensor:
    """[E, E] the (weighted) number of tokens whose first two choices are experts i < j, in the upper triangle;
    zeros for top-1 routing. index_add_, not bincount: bincount reads its maximum on the host (a CUDA sync)."""
    out = torch.zeros(E * E, device=experts_SK.device)
    if experts_SK.shape[1] >= 2:
        a, b = experts_SK[:, 0], experts_SK[:, 1]
        out.index_add_(0, torch.minimum(a, b) * E + torch.maximum(a, b), weight_S.float())
    return out.view(E, E)


def assignment_load(record) -> torch.Tensor:
    """[E] token-expert assignments of the real tokens, every one of the K choices, before capacity: the load the
    aux-loss-free bias balances (moe.update_expert_bias) and the logged load."""
    E, (S, K) = record.router_logits.shape[1], record.experts.shape
    w_M = real_tokens(record).repeat_interleave(K)
    return torch.zeros(E, device=w_M.device).index_add_(0, record.experts.reshape(-1), w_M)


def router_entropy(logits_SE) -> torch.Tensor:
    """[S] H(softmax(z)) in nats, fp32, no graph."""
    with torch.no_grad():
        logp_SE = F.log_softmax(logits_SE.detach().float(), dim=-1)
        return -(logp_SE.exp() * logp_SE).sum(dim=-1)


def sums_of(entropy_S, experts_SK, w_S, E: int) -> torch.Tensor:
    """[2 + E + E*E] counts of the tokens weighted by w_S [S] (1 to count a token, 0 not): tokens, sum of entropies,
    load (every one of the K choices, before capacity), co-activation."""
    w_S = w_S.float()
    K = experts_SK.shape[1]
    load_E = torch.zeros(E, device=w_S.device).index_add_(0, experts_SK.reshape(-1), w_S.repeat_interleave(K))
    head = torch.stack([w_S.sum(), (entropy_S * w_S).sum()])
    return torch.cat([head, load_E, coactivation_counts(experts_SK, w_S, E).reshape(-1)])


def layer_sums(record) -> torch.Tensor:
    """[2 + E + E*E] of one layer's real tokens: tokens, sum of their router entropies, load [E] (assignment_load),
    co-activation [E*E]."""
    E = record.router_logits.shape[1]
    return sums_of(router_entropy(record.router_logits), record.experts, real_tokens(record), E)


def load_balance(load_E):
    """(shares, load_var, utilisation) of a load vector (a list or tensor of counts)."""
    load = [float(x) for x in load_E]
    total, E = sum(load), len(load)
    shares = [x / total for x in load] if total > 0 else [0.0] * E
    var = sum((p - 1 / E) ** 2 for p in shares) / E if total > 0 else 0.0
    entropy = -sum(p * math.log(p) for p in shares if p > 0)
    return shares, var, (math.exp(entropy) / E if total > 0 else 0.0)


def top_pairs(coact_EE, tokens, top=8) -> list:
    """[[i, j, share of tokens], ...] the most frequent top-2 pairs first (at most `top`)."""
    E = len(coact_EE)
    pairs = [(coact_EE[i][j], i, j) for i in range(E) for j in range(i + 1, E) if coact_EE[i][j] > 0]
    return [[i, j, n / max(tokens, 1)] for n, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2]))[:top]]


def layer_stats(t, E: int, K: int) -> dict:
    """The logged numbers from summed `layer_sums` (a list of floats)."""
    tokens, entropy = t[0], t[1]
    shares, var, util = load_balance(t[2:2 + E])
    out = {"tokens": int(tokens), "entropy": entropy / max(tokens, 1), "load": shares, "load_var": var, "utilisation": util}
    if K >= 2:
        coact = t[2 + E:2 + E + E * E]
        out["coactivation"] = top_pairs([coact[i * E:(i + 1) * E] for i in range(E)], tokens)
    return out

# -----------------------------------------------------------------------------
# Pathways and specialisation (eval)


def pathway_counts(first_SL, keep_S=None) -> Counter:
    """Activated pathways: first_SL [S, L] each token's first-choice expert at each MoE layer (in layer order);
    counts of each distinct row among the kept tokens, as tuples."""
    if keep_S is not None:
        first_SL = first_SL[keep_S]
    if first_SL.shape[0] == 0:
        return Counter()
    rows, counts = torch.unique(first_SL.cpu(), dim=0, return_counts=True)
    return Counter({tuple(r): int(n) for r, n in zip(rows.tolist(), counts.tolist())})


def top_pathways(counter: Counter, top=10) -> list:
    """[[pathway, count, share], ...] the most frequent first (ties: the smaller pathway first)."""
    total = sum(counter.values())
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [[list(p), n, n / max(total, 1)] for p, n in ranked]


def purity_nmi(counts_DE) -> dict:
    """Expert-domain specialisation from counts_DE [domains, experts] (tokens of domain d whose first choice is e):
    purity = sum_e max_d n_de / N (each expert labelled by its majority domain), NMI = I(D; E) / ((H(D) + H(E)) / 2)
    (0 when either side has one value). In [0, 1]; 1: each expert serves one domain (and NMI: each domain one expert)."""
    n = torch.as_tensor(counts_DE, dtype=torch.float64)
    N = float(n.sum())
    if N == 0:
        return {"purity": 0.0, "nmi": 0.0, "tokens": 0}
    purity = float(n.max(dim=0).values.sum()) / N
    p = n / N
    pd, pe = p.sum(1), p.sum(0)
    H = lambda q: float(-(q[q > 0] * q[q > 0].log()).sum())            # noqa: E731
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pd[:, None] * pe[None, :]).expand_as(p)[nz]).log()).sum())
    denom = (H(pd) + H(pe)) / 2
    return {"purity": purity, "nmi": mi / denom if denom > 0 else 0.0, "tokens": int(N)}
