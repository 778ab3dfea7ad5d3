"""
cluster.py: the data-level alternative to token routing: cluster the instructions, route by cluster.

The STGC paper sets up its data-level comparison as MoCLE does (Gou et al. 2023, "Mixture of Cluster-conditional
LoRA Experts"): embed every instruction with the all-MiniLM-L6-v2 sentence encoder, run K-means, and let the
cluster pick the expert. This file holds the three pieces and their uses:

  SentenceEncoder   a BERT encoder (Devlin et al. 2019) in plain PyTorch, loaded from a local HF dir (config.json +
                    model.safetensors or pytorch_model.bin, tokenizer.json or vocab.txt), with sentence-transformers'
                    pooling for all-MiniLM-L6-v2: the mean of the last hidden states over the real tokens ([CLS] and
                    [SEP] included, padding excluded by the attention mask), then L2 normalisation. Parity with
                    transformers' BertModel: tests/test_cluster.py.
  kmeans            Lloyd's K-means in torch on the unit-norm embeddings, seeded, k-means++ initialisation
                    (Arthur & Vassilvitskii 2007), `n_init` restarts keeping the lowest inertia.
  ClusterRouter     a MoE router that ignores the token and routes every token of a sample to the expert its
                    cluster owns (cluster c -> expert c mod E): MoCLE-style routing as a baseline beside token-level
                    routing. It replaces a MoELayer's router module (install_cluster_routers); moe.py is unchanged.
  expert_loading_per_cluster  the analysis: each expert's share of a cluster's tokens, per MoE layer.

    python cluster.py --data out/synthetic/train.json --encoder ~/models/all-MiniLM-L6-v2 --k 4 --out clusters.json
    python cluster.py --data train.json --make-random-encoder out/encoder   # no weights here: a random stand-in

The command writes {"k", "encoder", "field", "clusters": {record id: cluster}, "centroids", "inertia"}.
`--make-random-encoder DIR` writes a randomly initialised BERT at all-MiniLM-L6-v2's shape with a WordPiece
vocabulary trained on the instructions, in the HF layout, for machines without the real weights (this one): a
random encoder keeps which words a sentence has but none of what they mean, so its clusters are lexical.
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model import load_checkpoint

# -----------------------------------------------------------------------------
# The BERT encoder (HF BertModel's computation; eval mode, so no dropout)


class BertConfig:
    """The fields of an HF BERT config.json that the forward pass reads; all-MiniLM-L6-v2's values as defaults."""

    def __init__(self, vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                 hidden_act="gelu", **_ignored):
        if hidden_act != "gelu":
            raise ValueError(f"hidden_act={hidden_act!r}: only BERT's exact (erf) 'gelu' is implemented")
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.max_positions, self.type_vocab_size, self.eps = max_position_embeddings, type_vocab_size, layer_norm_eps

    def to_hf(self) -> dict:
        return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_positions, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.eps, "hidden_act": "gelu", "pad_token_id": 0}


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x)) (BERT §3, as HF's BertLayer computes it)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads = cfg.num_heads
        self.query, self.key, self.value, self.attn_out = (nn.Linear(D, D) for _ in range(4))
        self.attn_norm = nn.LayerNorm(D, eps=cfg.eps)
        self.up, self.down = nn.Linear(D, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, D)
        self.ffn_norm = nn.LayerNorm(D, eps=cfg.eps)

    def forward(self, x, mask):                                        # x [B, T, D], mask [B, 1, 1, T] bool
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)   # noqa: E731  [B, H, T, hd]
        a = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(B, T, D)))
        return self.ffn_norm(x + self.down(F.gelu(self.up(x))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, D)
        self.position = nn.Embedding(cfg.max_positions, D)
        self.token_type = nn.Embedding(cfg.type_vocab_size, D)
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids, attention_mask):                      # [B, T], [B, T] -> [B, T, D]
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:T] + self.token_type.weight[0]   # token type 0 throughout
        x = self.norm(x)
        mask = attention_mask.bool()[:, None, None, :]                 # keys: real tokens only
        for layer in self.layers:
            x = layer(x, mask)
        return x


# One strict key map, HF BertModel names on the left ({} = layer index). A BertForMaskedLM / BertForPreTraining
# dir has the same keys under "bert." (stripped) plus heads, which are ignored, as is the pooler (mean pooling).
BERT_KEYS = {
    "embeddings.word_embeddings.weight": "word.weight",
    "embeddings.position_embeddings.weight": "position.weight",
    "embeddings.token_type_embeddings.weight": "token_type.weight",
    "embeddings.LayerNorm.weight": "norm.weight", "embeddings.LayerNorm.bias": "norm.bias",
    **{f"encoder.layer.{{}}.{hf}.{p}": f"layers.{{}}.{ours}.{p}" for hf, ours in (
        ("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
        ("attention.output.dense", "attn_out"), ("attention.output.LayerNorm", "attn_norm"),
        ("intermediate.dense", "up"), ("output.dense", "down"), ("output.LayerNorm", "ffn_norm")) for p in ("weight", "bias")},
}
BERT_IGNORED = ("pooler.", "cls.", "embeddings.position_ids")


def convert_bert(hf_sd: dict, cfg: BertConfig) -> dict:
    hf_sd = {k.removeprefix("bert."): v for k, v in hf_sd.items()}
    want = {}
    for hf, ours in BERT_KEYS.items():
        for i in range(cfg.num_layers) if "{}" in hf else [None]:
            want[hf.format(i) if i is not None else hf] = ours.format(i) if i is not None else ours
    unexpected = [k for k in hf_sd if k not in want and not k.startswith(BERT_IGNORED)]
    missing = [k for k in want if k not in hf_sd]
    if unexpected or missing:
        raise KeyError(f"BERT checkpoint keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {ours: hf_sd[hf] for hf, ours in want.items()}


def bert_to_hf(model: Bert) -> dict:
    """Our weights under HF BertModel names (for --make-random-encoder)."""
    inverse = {}
    for hf, ours in BERT_KEYS.items():
        for i in range(model.cfg.num_layers) if "{}" in hf else [None]:
            inverse[ours.format(i) if i is not None else ours] = hf.format(i) if i is not None else hf
    return {inverse[k]: v.contiguous() for k, v in model.state_dict().items()}

# -----------------------------------------------------------------------------
# The sentence encoder: tokenizer + BERT + mean pooling + L2 normalisation


def load_wordpiece(path: str):
    """tokenizer.json (with its [CLS] ... [SEP] post-processor), else vocab.txt as an uncased BERT WordPiece."""
    import tokenizers
    from tokenizers.implementations import BertWordPieceTokenizer
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    if os.path.isfile(os.path.join(path, "vocab.txt")):
        return BertWordPieceTokenizer(os.path.join(path, "vocab.txt"), lowercase=True)._tokenizer
    raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: truncate to max_seq_length (its
    sentence_bert_config.json, 256 for MiniLM), BERT, mean over the attention mask, L2 normalise."""

    def __init__(self, path: str, device="cpu"):
        with open(os.path.join(path, "config.json")) as f:
            self.cfg = BertConfig(**json.load(f))
        self.max_length = self.cfg.max_positions
        st = os.path.join(path, "sentence_bert_config.json")
        if os.path.isfile(st):
            with open(st) as f:
                self.max_length = min(self.max_length, json.load(f).get("max_seq_length", self.max_length))
        with torch.device("meta"):
            self.model = Bert(self.cfg)
        self.model.load_state_dict(convert_bert(load_checkpoint(path), self.cfg), assign=True, strict=True)
        self.model.to(device).eval()
        self.tokenizer, self.device, self.path = load_wordpiece(path), device, path
        self.tokenizer.enable_truncation(self.max_length)

    def tokenize(self, texts: list[str]):
        enc = self.tokenizer.encode_batch(texts)
        T = max(len(e.ids) for e in enc)
        ids = torch.zeros(len(texts), T, dtype=torch.long)
        mask = torch.zeros(len(texts), T, dtype=torch.long)
        for b, e in enumerate(enc):
            ids[b, :len(e.ids)], mask[b, :len(e.ids)] = torch.tensor(e.ids), 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:   # [N, D]
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not progress):
            ids, mask = self.tokenize(texts[start:start + batch_size])
            out.append(mean_pool(self.model(ids, mask), mask).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.hidden_size)


def mean_pool(h_BTD, mask_BT):
    """sentence-transformers' Pooling(mode='mean') + Normalize: sum of real-token states / their count, unit norm."""
    m = mask_BT[..., None].to(h_BTD.dtype)                             # [B, T, 1]
    mean = (h_BTD * m).sum(1) / m.sum(1).clamp_min(1e-9)               # [B, D]
    return F.normalize(mean, dim=-1)


def make_random_encoder(out_dir: str, texts: list[str], seed: int = 0, cfg: BertConfig | None = None,
                        vocab_size: int = 2000) -> str:
    """A random BERT (HF's init: normal(0, 0.02) weights, zero biases, unit LayerNorms) at all-MiniLM-L6-v2's shape,
    with an uncased WordPiece vocabulary trained on `texts`, saved as an HF dir. A stand-in only."""
    from safetensors.torch import save_file
    from tokenizers.implementations import BertWordPieceTokenizer
    os.makedirs(out_dir, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    wp.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = cfg or BertConfig()
    cfg.vocab_size = wp.get_vocab_size()
    torch.manual_seed(seed)
    model = Bert(cfg)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    save_file(bert_to_hf(model), os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf() | {"note": f"random init (seed {seed}): a stand-in for all-MiniLM-L6-v2"}, f, indent=1)
    return out_dir

# -----------------------------------------------------------------------------
# K-means


def kmeans_pp_init(x_ND, k: int, generator) -> torch.Tensor:
    """k-means++: the first centre uniformly, each next one with probability proportional to the squared distance
    to the nearest centre chosen so far."""
    N = x_ND.shape[0]
    centres = [x_ND[torch.randint(N, (1,), generator=generator)].squeeze(0)]
    d2 = ((x_ND - centres[0]) ** 2).sum(-1)                            # [N]
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / N)
        centres.append(x_ND[torch.multinomial(p, 1, generator=generator)].squeeze(0))
        d2 = torch.minimum(d2, ((x_ND - centres[-1]) ** 2).sum(-1))
    return torch.stack(centres)                                        # [k, D]


def kmeans(x_ND, k: int, seed: int = 0, n_init: int = 4, iters: int = 100, tol: float = 1e-6):
    """Lloyd's algorithm under squared Euclidean distance (on unit vectors: 2 - 2 cos), k-means++ starts, the best
    of n_init restarts by inertia. Returns (labels [N], centres [k, D], inertia). An emptied cluster takes the point
    farthest from its centre. Deterministic in seed."""
    x_ND = x_ND.double()
    if x_ND.shape[0] < k:
        raise ValueError(f"k={k} clusters need at least {k} points, got {x_ND.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        c_KD = kmeans_pp_init(x_ND, k, g)
        for _ in range(iters):
            d_NK = torch.cdist(x_ND, c_KD) ** 2
            labels = d_NK.argmin(1)
            new = torch.zeros_like(c_KD).index_add_(0, labels, x_ND)
            counts = torch.bincount(labels, minlength=k)
            for j in (counts == 0).nonzero().flatten().tolist():       # reseed an empty cluster
                far = d_NK.min(1).values.argmax()
                new[j], counts[j], labels[far] = x_ND[far], 1, j
            new = new / counts[:, None]
            shift = (new - c_KD).norm(dim=-1).max()
            c_KD = new
            if shift < tol:
                break
        d_NK = torch.cdist(x_ND, c_KD) ** 2
        labels = d_NK.argmin(1)
        inertia = float(d_NK.gather(1, labels[:, None]).sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (labels, c_KD.float(), inertia)
    return best


def assign(x_ND, centres_KD) -> torch.Tensor:
    return torch.cdist(x_ND.double(), centres_KD.double()).argmin(1)

# -----------------------------------------------------------------------------
# Instructions of a LLaVA JSON, and a cluster per record


def instruction(rec: dict) -> str:
    """What MoCLE clusters: the instruction, here the first human turn without the "<image>" placeholder."""
    return rec["conversations"][0]["value"].replace("<image>", "").strip()


def embed_records(records: list[dict], encoder: SentenceEncoder, progress: bool = False) -> torch.Tensor:
    """[N, D] one embedding per record; each distinct instruction is encoded once."""
    texts = [instruction(r) for r in records]
    unique = sorted(set(texts))
    emb = encoder.encode(unique, progress=progress)
    row = {t: i for i, t in enumerate(unique)}
    return emb[[row[t] for t in texts]]


def cluster_records(records: list[dict], encoder: SentenceEncoder, k: int, seed: int = 0, progress: bool = False) -> dict:
    x = embed_records(records, encoder, progress)
    labels, centres, inertia = kmeans(x, k, seed)
    return {"k": k, "encoder": os.path.abspath(encoder.path), "field": "first human turn, without <image>",
            "seed": seed, "clusters": {str(r.get("id", i)): int(c) for i, (r, c) in enumerate(zip(records, labels.tolist()))},
            "centroids": centres.tolist(), "inertia": inertia}


def agreement(labels: list, truth: list) -> dict:
    """How well clusters recover known groups: purity (each cluster counted as its majority group) and normalised
    mutual information (arithmetic-mean normalisation, as scikit-learn's default)."""
    n = len(labels)
    if n == 0:
        return {"purity": None, "nmi": None}
    pairs = {}
    for a, b in zip(labels, truth):
        pairs[a, b] = pairs.get((a, b), 0) + 1
    ca, cb = {}, {}
    for (a, b), c in pairs.items():
        ca[a], cb[b] = ca.get(a, 0) + c, cb.get(b, 0) + c
    purity = sum(max(c for (a2, _), c in pairs.items() if a2 == a) for a in ca) / n
    mi = sum(c / n * math.log(c * n / (ca[a] * cb[b])) for (a, b), c in pairs.items())
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    return {"purity": purity, "nmi": mi / ((ha + hb) / 2) if ha + hb > 0 else 1.0}

# -----------------------------------------------------------------------------
# Routing by cluster (MoCLE-style baseline), and expert loading per cluster


class ClusterRouter(nn.Module):
    """Stands in for a MoELayer's nn.Linear router: logits [S, E] = margin * onehot(expert of the token's sample),
    expert = group mod E, so moe.route's top-1 is that expert (with margin 10 its gate is 1 - 3e-4 at E = 4). No
    parameters: nothing about this routing is learned, as with a hard cluster -> expert assignment. `groups` [B]
    (one cluster id per sample) must be set before each forward; tokens s = b * T + t, as moe.py flattens them."""

    def __init__(self, num_experts: int, margin: float = 10.0):
        super().__init__()
        self.num_experts, self.margin, self.groups = num_experts, margin, None

    def forward(self, x_SD):                                           # [S, D] -> [S, E]
        B = self.groups.shape[0]
        if x_SD.shape[0] % B:
            raise ValueError(f"{x_SD.shape[0]} tokens do not split into {B} samples")
        expert_S = (self.groups.to(x_SD.device) % self.num_experts).repeat_interleave(x_SD.shape[0] // B)
        logits = self.margin * F.one_hot(expert_S, self.num_experts).to(x_SD.dtype)
        # a leaf that takes a gradient when one is being recorded, so that STGC's hooks on the router logits can
        # attach (the testbed measures conflicts here with beta = 0); nothing upstream of it receives any
        return logits.requires_grad_() if torch.is_grad_enabled() else logits


def install_cluster_routers(model, margin: float = 10.0) -> list:
    """Replace the router of every MoE layer of a LlavaModel by a ClusterRouter; returns them (set .groups)."""
    from moe import MoELayer
    routers = []
    for block in model.lm.layers:
        if isinstance(block.mlp, MoELayer):
            block.mlp.router = ClusterRouter(block.mlp.cfg.num_experts, margin)
            routers.append(block.mlp.router)
    if not routers:
        raise ValueError("the model has no MoE layer to route by cluster")
    return routers


def set_groups(routers: list, groups) -> None:
    for r in routers:
        r.groups = torch.as_tensor(groups)


def expert_loading_per_cluster(experts_SK, kept_SK, group_S, k: int, num_experts: int) -> torch.Tensor:
    """[k, E] share of each cluster's kept (token, expert) assignments that each expert takes (rows sum to 1)."""
    onehot = F.one_hot(experts_SK, num_experts).float() * kept_SK[..., None]      # [S, K, E]
    counts = torch.zeros(k, num_experts).index_add_(0, group_S.cpu(), onehot.sum(1).cpu())
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def main(argv=None):
    p = argparse.ArgumentParser(description="Cluster the instructions of a LLaVA JSON (MoCLE / STGC's data-level "
                                            "setup): sentence-encoder embeddings, K-means, a cluster id per record.")
    p.add_argument("--data", required=True, help="a LLaVA JSON (list of records with conversations)")
    p.add_argument("--encoder", help="a local HF BERT dir, e.g. sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--make-random-encoder", metavar="DIR",
                   help="write a random BERT at MiniLM's shape with a vocabulary of these instructions to DIR and use it")
    p.add_argument("--k", type=int, default=4, help="clusters (MoCLE: 64 on its mix; here the number of experts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where to write the clusters (default: <data>.clusters.json)")
    a = p.parse_args(argv)
    with open(a.data) as f:
        records = json.load(f)
    if bool(a.encoder) == bool(a.make_random_encoder):
        p.error("give exactly one of --encoder DIR and --make-random-encoder DIR")
    path = a.encoder or make_random_encoder(a.make_random_encoder, sorted({instruction(r) for r in records}), a.seed)
    result = cluster_records(records, SentenceEncoder(path), a.k, a.seed, progress=True)
    if all("domain" in r for r in records):                            # the synthetic sets know their domains
        result["agreement_with_domain"] = agreement(list(result["clusters"].values()), [r["domain"] for r in records])
    out = a.out or os.path.splitext(a.data)[0] + ".clusters.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    sizes = [list(result["clusters"].values()).count(c) for c in range(a.k)]
    print(f"cluster: {len(records)} records -> {a.k} clusters of {sizes}; wrote {out}"
          + (f"; agreement with domain {result['agreement_with_domain']}" if "agreement_with_domain" in result else ""))
    return result


if __name__ == "__main__":
    main()
