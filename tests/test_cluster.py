"""cluster.py: the BERT sentence encoder against transformers' BertModel, K-means, the command, the cluster router."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cluster  # noqa: E402

TEXTS = ["What color is the circle in the top left?", "hello", "[beta] What color is the shape?", "a b c d e f g"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BertModel saved with save_pretrained, our tokenizer (WordPiece on TEXTS) beside it."""
    transformers = pytest.importorskip("transformers")
    path = str(tmp_path_factory.mktemp("bert"))
    cluster.make_random_encoder(path, TEXTS, cfg=cluster.BertConfig(hidden_size=32, num_hidden_layers=2,
                                                                    num_attention_heads=4, intermediate_size=64,
                                                                    max_position_embeddings=64), vocab_size=200)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    torch.manual_seed(1)
    hf = transformers.BertModel(transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64,
                                                        max_position_embeddings=64)).eval()
    with torch.no_grad():                              # not HF's init alone: make LayerNorms and biases non-trivial
        for n, p in hf.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)                           # overwrites config.json and model.safetensors
    return path, hf


def test_encoder_matches_transformers_bert(tiny_bert):
    """Last hidden states equal HF's on a padded batch, and the sentence embedding is HF's states mean-pooled over
    the mask and L2-normalised (sentence-transformers' Pooling + Normalize)."""
    path, hf = tiny_bert
    enc = cluster.SentenceEncoder(path)
    ids, mask = enc.tokenize(TEXTS)
    assert (mask == 0).any()                                           # padding is exercised
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = enc.model(ids, mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() < 1e-5
    m = mask[..., None].float()
    want = torch.nn.functional.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
    got = enc.encode(TEXTS, batch_size=3)                              # other batches, other padding: same vectors
    assert (got - want).abs().max() < 1e-5 and torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)))


def test_encoder_key_map_is_strict(tiny_bert, tmp_path):
    path, hf = tiny_bert
    sd = {k: v for k, v in cluster.load_checkpoint(path).items() if "layer.1.output.dense.bias" not in k}
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.bias"):
        cluster.convert_bert(sd, cluster.BertConfig(**json.load(open(os.path.join(path, "config.json")))))
    # a BertForMaskedLM-style dir (keys under "bert.", an MLM head) loads the same weights; .bin via weights_only
    prefixed = {f"bert.{k}": v for k, v in cluster.load_checkpoint(path).items()} | {"cls.predictions.bias": torch.zeros(3)}
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text(open(os.path.join(path, name)).read())
    torch.save(prefixed, tmp_path / "pytorch_model.bin")
    a, b = cluster.SentenceEncoder(path).encode(TEXTS), cluster.SentenceEncoder(str(tmp_path)).encode(TEXTS)
    assert torch.equal(a, b)


def blobs(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [-4.0, -4.0, 0]])
    truth = torch.arange(4).repeat_interleave(n)
    return centres[truth] + 0.3 * torch.randn(4 * n, 3, generator=g), truth


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, truth = blobs()
    labels, centres, inertia = cluster.kmeans(x, 4, seed=0)
    assert cluster.agreement(labels.tolist(), truth.tolist()) == {"purity": 1.0, "nmi": pytest.approx(1.0)}
    again = cluster.kmeans(x, 4, seed=0)
    assert torch.equal(labels, again[0]) and inertia == again[2]
    assert torch.equal(cluster.assign(x, centres), labels)
    # inertia is the sum of squared distances to the assigned centres, and Lloyd never ends worse than its start
    assert inertia == pytest.approx(float(((x - centres[labels]) ** 2).sum()), rel=1e-5)
    assert inertia < 0.3 ** 2 * 3 * len(x) * 1.3


def test_kmeans_pp_spreads_its_starts():
    """k-means++ picks the next centre far from the chosen ones: on 4 tight blobs its 4 starts land in 4 blobs
    almost always (uniform starts would in 4!/4^4 = 9% of draws)."""
    x, truth = blobs(n=50)
    hits = 0
    for seed in range(20):
        c = cluster.kmeans_pp_init(x.double(), 4, torch.Generator().manual_seed(seed))
        hits += len(set(cluster.assign(c, x.double()[[0, 50, 100, 150]]).tolist())) == 4
    assert hits >= 18


def test_agreement_by_hand():
    # clusters [0, 0, 1, 1] vs truth [a, b, b, b]: purity (1 + 2) / 4. MI = 1/4 ln 2 + 1/4 ln 2/3 + 1/2 ln 4/3,
    # H(clusters) = ln 2, H(truth) = -(1/4 ln 1/4 + 3/4 ln 3/4); NMI = MI / mean of the two entropies
    r = cluster.agreement([0, 0, 1, 1], ["a", "b", "b", "b"])
    mi = 0.25 * math.log(2) + 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    h_truth = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert r["purity"] == 0.75 and r["nmi"] == pytest.approx(mi / ((math.log(2) + h_truth) / 2))
    assert r["nmi"] == pytest.approx(0.34371, abs=1e-5)


def test_command_writes_a_cluster_per_record(tmp_path, capsys):
    records = [{"id": f"r{i}", "domain": "ab"[i % 2], "conversations": [
        {"from": "human", "value": "<image>\n" + ("[alpha] What color?" if i % 2 else "[beta] Where is it?")},
        {"from": "gpt", "value": "red"}]} for i in range(12)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(SystemExit):
        cluster.main(["--help"])
    assert "--make-random-encoder" in capsys.readouterr().out
    cluster.main(["--data", str(tmp_path / "d.json"), "--make-random-encoder", str(tmp_path / "enc"), "--k", "2",
                  "--out", str(tmp_path / "c.json")])
    assert "12 records -> 2 clusters" in capsys.readouterr().out
    out = json.loads((tmp_path / "c.json").read_text())
    assert sorted(out["clusters"]) == sorted(r["id"] for r in records) and set(out["clusters"].values()) <= {0, 1}
    # two distinct instructions, each repeated: any encoder puts the copies together, so the clusters are the domains
    assert out["agreement_with_domain"]["purity"] == 1.0


def test_cluster_router_routes_each_sample_to_its_clusters_expert():
    from moe import MoEConfig, MoELayer
    from model import GeluMLP, LMConfig
    lm = LMConfig(family="phi", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, mlp="gelu",
                  act="gelu_new", mlp_bias=True)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=1, dropless=True), GeluMLP(lm))
    layer.router = cluster.ClusterRouter(4)
    layer.router.groups = torch.tensor([2, 0, 5])                      # cluster 5 -> expert 1
    y, rec = layer(torch.randn(3, 7, 16))
    assert rec.experts[:, 0].view(3, 7).tolist() == [[2] * 7, [0] * 7, [1] * 7] and bool(rec.kept.all())
    load = cluster.expert_loading_per_cluster(rec.experts, rec.kept, torch.tensor([2, 0, 1]).repeat_interleave(7), 3, 4)
    assert load.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
