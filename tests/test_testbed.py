"""The conflict variant of the synthetic set does what it says (data.py), and bench/testbed.py runs end to end."""
import json
import os
import sys
from collections import Counter, defaultdict

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import data  # noqa: E402
import testbed  # noqa: E402
import train  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dial(tmp_path_factory):
    """One seed at strengths 0, 0.5 and 1 (small, 32-pixel images)."""
    root = tmp_path_factory.mktemp("conflict")
    return {s: (str(root / f"s{s:g}"), data.build_synthetic_dataset(
        str(root / f"s{s:g}"), seed=3, n_train=160, n_val=4, n_test=24, image_size=32, variant="conflict",
        conflict_strength=s)) for s in (0.0, 0.5, 1.0)}


def records(dial, s, split="train"):
    return json.load(open(dial[s][1][f"{split}.json"]))


def asked(rec):
    """(turn index, asked object) for each question of a record: the cell named in the question."""
    out = []
    for t in rec["conversations"][::2]:
        cell = next(c for c in data.CELLS if f"in the {c}?" in t["value"])
        out.append(next(o for o in rec["scene"]["objects"] if data.CELLS[o["cell"]] == cell))
    return out


def test_default_variant_is_untouched(tmp_path):
    """The conflict variant is opt-in: the default arguments and variant='default' write the same bytes."""
    a = data.build_synthetic_dataset(str(tmp_path / "a"), seed=1, n_train=20, n_val=2, n_test=6, image_size=32)
    b = data.build_synthetic_dataset(str(tmp_path / "b"), seed=1, n_train=20, n_val=2, n_test=6, image_size=32,
                                     variant="default", conflict_strength=0.3)
    for name in ("train.json", "test.json", "meta.json", "tokenizer.json", "eval/pope/llava_pope_test.jsonl"):
        assert open(a[name], "rb").read() == open(b[name], "rb").read(), name
    assert "conflict" not in json.load(open(a["meta.json"]))
    with pytest.raises(ValueError):
        data.build_synthetic_dataset(str(tmp_path / "c"), n_train=2, n_val=0, n_test=0, variant="conflict", conflict_strength=1.5)


def test_dial_changes_only_the_answers(dial):
    """Same seed, any strength: the same images, questions and tokenizer; answers differ exactly where the rules do."""
    (d0, p0), (d1, p1) = dial[0.0], dial[1.0]
    assert open(p0["tokenizer.json"]).read() == open(p1["tokenizer.json"]).read()
    r0, r1 = records(dial, 0.0), records(dial, 1.0)
    for a, b in zip(r0, r1):
        assert a["scene"] == b["scene"] and a["domain"] == b["domain"]
        assert [t["value"] for t in a["conversations"][::2]] == [t["value"] for t in b["conversations"][::2]]
    for name in ("train/000000.png", "test/000003.png"):
        assert open(os.path.join(d0, "images", name), "rb").read() == open(os.path.join(d1, "images", name), "rb").read()


def test_answers_follow_the_rule_and_the_pixels(dial):
    """Every answer is conflict_answer(domain, the asked cell's colour as rendered); domain k at s = 1 names the
    colour k steps round the wheel; at s = 0.5 only red, orange and yellow move; the marker names the domain."""
    for s in (0.0, 0.5, 1.0):
        folder = dial[s][0]
        for rec in records(dial, s)[:60]:
            img = Image.open(os.path.join(folder, "images", rec["image"])).convert("RGB")
            assert rec["conversations"][0]["value"].startswith(f"<image>\n[{rec['domain']}] What color is the ")
            assert data.CONFLICT_DOMAINS.index(rec["domain"]) == rec["domain_index"]
            for turn, o in zip(rec["conversations"][1::2], asked(rec)):
                x, y = (o["cell"] % 2) * 16 + 8, (o["cell"] // 2) * 16 + 10   # inside every shape (triangles too)
                seen = min(data.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(data.COLOURS[c], img.getpixel((x, y)))))
                assert seen == o["colour"]
                k = rec["domain_index"]
                want = data.WHEEL[(data.WHEEL.index(seen) + k) % 6] if s == 1.0 else seen if s == 0.0 else \
                    data.WHEEL[(data.WHEEL.index(seen) + k) % 6] if seen in ("red", "orange", "yellow") else seen
                assert turn["value"] == want == data.conflict_answer(rec["domain"], seen, s)


def test_meta_documents_the_ideal_routing_and_the_ceiling(dial):
    meta = json.load(open(dial[0.5][1]["meta.json"]))
    c = meta["conflict"]
    assert meta["variant"] == "conflict" and c["ideal_routing"] == {"alpha": 0, "beta": 1, "gamma": 2, "delta": 3}
    assert c["conflicted_colours"] == ["red", "orange", "yellow"] and c["domain_blind_ceiling"] == pytest.approx(0.625)
    assert sum(meta["splits"]["train"].values()) == 160 and set(meta["splits"]["train"]) == set(data.CONFLICT_DOMAINS)


def test_domain_blind_ceiling_is_what_the_data_allow(dial):
    """Without the domain, the best one can do is the majority answer of each (asked colour): measured on the
    records, it is 100% at s = 0 and near the documented 25% at s = 1 (the documented value assumes uniform draws)."""
    for s, lo, hi in ((0.0, 1.0, 1.0), (0.5, 0.55, 0.75), (1.0, 0.25, 0.40)):
        by_colour = defaultdict(Counter)
        for rec in records(dial, s):
            for turn, o in zip(rec["conversations"][1::2], asked(rec)):
                by_colour[o["colour"]][turn["value"]] += 1
        best = sum(c.most_common(1)[0][1] for c in by_colour.values()) / sum(sum(c.values()) for c in by_colour.values())
        assert lo <= best <= hi, (s, best)
        assert lo - 0.01 <= data.domain_blind_ceiling(s) <= hi


def test_conflict_shows_in_a_shared_ffn_gradients(dial, tmp_path):
    """The self-check on a model: tokens that look alike to a domain-blind model (same question, same asked colour)
    pull a shared FFN apart when their domains differ. Gradient of the LM loss at the decoder's first FFN output
    (STGC's 'bias' proxy for that shared expert), at the positions that predict an answer, of a tiny random dense
    model: among same-colour pairs, cross-domain pairs are as aligned as same-domain ones at s = 0 (cosines 0.99994
    and 0.99993 when written) and nearly orthogonal at s = 1 (0.9999 vs 0.02). Over all pairs, which mix colours,
    no split shows at either strength (0.21 vs 0.20): at random init a token's gradient is set by its target word
    alone, so the conflict is visible only between tokens that a domain-blind model cannot tell apart. (The
    conflict ratios of trained models, at each strength, are the testbed's table: README.)"""
    cfg = train.load_config(testbed.CONFIG, ["--model.lm.hidden_size=32", "--model.lm.intermediate_size=64",
                                             "--model.lm.num_layers=2", "--model.vision.hidden_size=32",
                                             "--model.vision.intermediate_size=64", "--model.vision.image_size=32",
                                             "--model.vision.patch_size=16", "--data.image_size=32"])
    splits = {}
    for s in (0.0, 1.0):
        folder = dial[s][0]
        tok = data.Tokenizer.load(os.path.join(folder, "tokenizer.json"), "phi")
        splits[s] = testbed.Split(folder, "train", tok, cfg, [0] * 160)
    torch.manual_seed(0)
    model = train.build_model(cfg, tok.vocab_size)
    colour = {s: torch.tensor([data.WHEEL.index(asked(r)[0]["colour"]) for r in records(dial, s)]) for s in splits}
    split = {}
    for s, sp in splits.items():
        idx = list(range(96))
        mb = sp.batch(idx)
        g, dom = testbed.answer_gradients(model, mb, layer=0, first_only=True)   # [96, D], [96]: the first answer
        col = colour[s][idx]                                                     # token, asked(r)[0]'s colour
        u = torch.nn.functional.normalize(g.double(), dim=-1)
        cos = u @ u.T
        same_colour = (col[:, None] == col[None, :]) & ~torch.eye(len(col), dtype=torch.bool)
        same_domain = dom[:, None] == dom[None, :]
        split[s] = (float(cos[same_colour & same_domain].mean()), float(cos[same_colour & ~same_domain].mean()))
        stats = testbed.domain_split(g, dom)
        assert abs(stats["within"] - stats["across"]) < 0.05                # mixed colours: no split at init
    (w0, a0), (w1, a1) = split[0.0], split[1.0]
    assert abs(w0 - a0) < 0.05 and w0 > 0.9                                   # s = 0: one task under four names
    assert w1 > 0.9 and w1 - a1 > 0.3                                         # s = 1: same input, opposing pulls


def test_purity_is_the_best_one_to_one_match():
    n = torch.tensor([[10., 0, 0, 0], [0, 0, 8, 2], [0, 5, 0, 0], [3, 0, 0, 7]])
    assert testbed.ideal_purity(n) == pytest.approx((10 + 8 + 5 + 7) / 35)
    assert testbed.ideal_purity(torch.full((4, 4), 1.0)) == 0.25               # all experts alike: chance
    assert testbed.ideal_purity(torch.tensor([[4., 0, 0, 0]] * 4)) == 0.25     # one expert takes all: chance too


def test_testbed_quick_end_to_end(tmp_path):
    """Data, clusters, the base and a run of each router kind, each in its own (forked) process, then the table; a
    second call reuses every cached stage; a changed setting is a new key."""
    out = str(tmp_path / "tb")
    methods = ["dense", "moe", "stgc_b0.5", "cluster", "oracle"]
    res = testbed.main(["--quick", "--out", out, "--methods", *methods, "--strengths", "0", "1", "--seeds", "0"])
    assert len(res["runs"]) == 10 and {r["method"] for r in res["runs"]} == set(methods)
    text = open(os.path.join(out, "table.md")).read()
    assert "| stgc_b0.5 (n=1) | 1 | 25 |" in text and "| oracle (n=1) | 0 | 100 |" in text
    runs = {(r["method"], r["strength"]): r for r in res["runs"]}
    oracle = runs["oracle", 1.0]
    assert all(p == 1.0 for p in oracle["purity"])                           # the ideal routing, imposed
    assert all(max(row) == 1.0 for layer in oracle["loading_by_domain"] for row in layer)
    assert runs["stgc_b0.5", 1.0]["curve"]["step"] == [0, 1, 2] and "purity" not in runs["dense", 1.0]
    assert set(runs["moe", 0.0]["accuracy"]) == set(data.CONFLICT_DOMAINS)
    stamp = os.path.getmtime(os.path.join(out, "runs", "moe_s1_seed0", "summary.json"))
    testbed.main(["--quick", "--out", out, "--methods", "moe", "--strengths", "1", "--seeds", "0"])
    assert os.path.getmtime(os.path.join(out, "runs", "moe_s1_seed0", "summary.json")) == stamp
    st = testbed.QUICK
    prints = testbed.build_data(out, st, [1.0])
    key = testbed.run_key(st, prints, testbed.base_key(st, prints), "moe", 1.0, 0)
    assert key == json.load(open(os.path.join(out, "runs", "moe_s1_seed0", "summary.json")))["key"]
    assert key != testbed.run_key(st, prints, testbed.base_key(st, prints), "moe", 1.0, 1)
