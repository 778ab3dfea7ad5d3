"""Tests for data.py: tokenizers, templates, label masks, images, the LLaVA dataset, batching, sampler,
and the synthetic dataset. CPU-only and offline: every tokenizer, image and JSON is built here."""
import base64
import hashlib
import io
import json
import math
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, SYSTEM, SYSTEM_LLAVA, TEMPLATES, DataConfig, DataError,
                  LlavaJsonDataset, ModalityLengthGroupedSampler, Skip, Tokenizer, collate, process_image,
                  tokenize_conversation, train_bpe_tokenizer)

CORPUS = [SYSTEM, SYSTEM_LLAVA,
          "USER: What color is the circle? ASSISTANT: It is red.",
          "USER: How many? ASSISTANT: Three. USER: Where is it? ASSISTANT: At the top left.",
          "Describe the image briefly. A red circle and a blue square. Is there a cat? yes no 1 2 3",
          "What is 1 plus 2? The answer is 3. Same? no word words long"] * 4


def make_tok(family: str, specials: list[str]) -> Tokenizer:
    return Tokenizer(train_bpe_tokenizer(CORPUS, 400, specials), family)


@pytest.fixture(scope="module")
def phi_tok(tmp_path_factory):
    # written and read back as tokenizer.json, the way a run loads it; <|extra_0|> is left for the family to add
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe_tokenizer(CORPUS, 400, ["<|endoftext|>"]).save(path)
    return Tokenizer.from_file(path, "phi")


@pytest.fixture(scope="module")
def llama_tok():
    return make_tok("llama", ["<unk>", "<s>", "</s>"])


# -----------------------------------------------------------------------------
# Tokenizers

def test_family_special_tokens():
    tk = train_bpe_tokenizer(CORPUS, 400, ["<|endoftext|>"])
    n = tk.get_vocab_size()
    phi = Tokenizer(tk, "phi")                        # unk '<|extra_0|>' is added as a new token (§3.2)
    assert phi.unk_id == n and phi.pad_id == phi.unk_id and phi.vocab_size == n + 1
    assert phi.eos_id == tk.token_to_id("<|endoftext|>") and phi.bos_id is None
    assert phi.tokenize_with_images("red") == phi.encode("red")            # no BOS
    qwen = make_tok("qwen", ["<|endoftext|>", "<|extra_0|>"])                # already there: not added again
    assert qwen.pad_id == qwen.unk_id == qwen.tk.token_to_id("<|extra_0|>") and qwen.vocab_size == 400
    stablelm = make_tok("stablelm", ["<|endoftext|>", "<|reg0|>"])           # cannot grow: pad := <|reg0|>
    assert stablelm.pad_id == stablelm.tk.token_to_id("<|reg0|>") and stablelm.vocab_size == 400
    with pytest.raises(ValueError, match="reg0"):
        make_tok("stablelm", ["<|endoftext|>"])
    llama = make_tok("llama", ["<unk>", "<s>", "</s>"])
    assert (llama.bos_id, llama.eos_id, llama.pad_id) == tuple(llama.tk.token_to_id(t) for t in ("<s>", "</s>", "<unk>"))
    assert llama.tokenize_with_images("red") == [llama.bos_id] + llama.encode("red")


def test_tiktoken_special_lists_give_the_reference_ids():
    # §3.2: Qwen eos 151643 (ranks 0..151642, specials after); Arcade100k eos 100257, <|reg0|> 100280
    assert 151643 + data.QWEN_SPECIALS.index("<|endoftext|>") == 151643 and "<|extra_0|>" in data.QWEN_SPECIALS
    assert 100257 + data.ARCADE100K_SPECIALS.index("<|reg0|>") == 100280
    assert 100257 + data.ARCADE100K_SPECIALS.index("<|endoftext|>") == 100257


def test_tokenize_with_images(phi_tok, llama_tok):
    text = "<image>\nWhat is this?<image> and<image>"
    want = ([IMAGE_TOKEN_INDEX] + phi_tok.encode("\nWhat is this?") + [IMAGE_TOKEN_INDEX] + phi_tok.encode(" and")
            + [IMAGE_TOKEN_INDEX])
    assert phi_tok.tokenize_with_images(text) == want
    assert llama_tok.tokenize_with_images(text)[:2] == [llama_tok.bos_id, IMAGE_TOKEN_INDEX]   # BOS once (§3.4)
    assert llama_tok.tokenize_with_images(text).count(llama_tok.bos_id) == 1
    assert phi_tok.decode(want) == "\nWhat is this? and"
    ids = phi_tok.encode("It is red.<|endoftext|>")
    assert ids[-1] == phi_tok.eos_id and ids.count(phi_tok.eos_id) == 1
    assert phi_tok.decode(ids) == "It is red." and phi_tok.decode(ids, skip_special_tokens=False) == "It is red.<|endoftext|>"


ASCII_PATTERN = r"""'s|'t| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""   # same matches in re and Oniguruma
RANK_TEXTS = ["the cat sat on the mat", "the rat ate the oats", "that hat is theirs", "abcabc abc ab bc"]


def tiny_ranks(texts, n_merges, findall):
    """A tiktoken-style rank table made by a plain BPE trainer: 256 bytes, then merges in order."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([c]) for c in w.encode()) for t in texts for w in findall(t))
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    ranks[b" zebra"] = len(ranks)   # reachable by no merge: tiktoken takes a whole pre-token that is a token
    ranks[b"bca"] = len(ranks)      # two valid splits ("bc"+"a", "b"+"ca"?) exercise the merge ordering
    return ranks


def reference_tiktoken(ranks, findall, text):
    """tiktoken's algorithm: a pre-token that is a token is taken whole; otherwise repeatedly merge the
    leftmost adjacent pair whose concatenation has the lowest rank."""
    out = []
    for piece in findall(text):
        b = piece.encode()
        if b in ranks:
            out.append(ranks[b])
            continue
        parts = [bytes([x]) for x in b]
        while len(parts) > 1:
            k = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            if parts[k] + parts[k + 1] not in ranks:
                break
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        out += [ranks[p] for p in parts]
    return out


def write_ranks(path, ranks):
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


@pytest.mark.parametrize("pattern", ["ascii", "qwen"])
def test_tiktoken_conversion_matches_reference_bpe(tmp_path, pattern):
    if pattern == "qwen":
        regex = pytest.importorskip("regex")                 # \p{L} needs the regex module on the Python side
        pat, findall = data.QWEN_PATTERN, regex.compile(data.QWEN_PATTERN).findall
    else:
        pat, findall = ASCII_PATTERN, re.compile(ASCII_PATTERN).findall
    ranks = tiny_ranks(RANK_TEXTS, 40, findall)
    write_ranks(tmp_path / "tiny.tiktoken", ranks)
    specials = ["<|endoftext|>", "<|im_start|>", "<|extra_0|>"]
    tok = Tokenizer.from_tiktoken(str(tmp_path / "tiny.tiktoken"), "qwen", specials, pattern=pat)
    for text in ["the cat sat on the mat", "theirs: that rat's oats!", "a zebra abcabca bca",
                 "  héllo ✓ 12345\n\nthe\tend ", "unseen words entirely", "Hello, World"]:
        assert tok.encode(text) == reference_tiktoken(ranks, findall, text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" zebra") == [ranks[b" zebra"]]
    n = len(ranks)
    assert tok.eos_id == n and tok.unk_id == tok.pad_id == n + 2 and tok.vocab_size == n + 3   # specials follow the ranks
    assert tok.encode("the<|endoftext|>") == reference_tiktoken(ranks, findall, "the") + [n]
    # Arcade100k-style: specials at a given start id; a collision with a rank is an error
    tk = data.tiktoken_to_tokenizers(ranks, ["<|endoftext|>", "<|reg0|>"], special_start=n + 10, pattern=pat)
    assert tk.token_to_id("<|reg0|>") == n + 11
    with pytest.raises(ValueError, match="collides"):
        data.tiktoken_to_tokenizers(ranks, ["<|endoftext|>"], special_start=5, pattern=pat)


def test_tiktoken_bad_rank_file(tmp_path):
    (tmp_path / "bad.tiktoken").write_text("YQ== 0\nthis is not a rank line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        data.load_tiktoken_ranks(str(tmp_path / "bad.tiktoken"))

# -----------------------------------------------------------------------------
# Templates and label masks

def test_render_templates():
    turns = ["<image>\nQ1", "A1", "Q2", "A2"]
    two = " USER: <image>\nQ1 ASSISTANT: A1{e}USER: Q2 ASSISTANT: A2{e}"
    for name in ("phi", "qwen", "stablelm"):
        assert TEMPLATES[name].render(turns) == SYSTEM + two.format(e="<|endoftext|>")
    for name, system in (("v1", SYSTEM), ("vicuna_v1", SYSTEM), ("llava_v1", SYSTEM_LLAVA)):
        assert TEMPLATES[name].render(turns) == system + two.format(e="</s>")
    assert TEMPLATES["phi"].render(["<image>\nQ"]) == SYSTEM + " USER: <image>\nQ ASSISTANT:"   # generation prompt
    assert TEMPLATES["phi"].render(["Q1", "A1", "Q2"]).endswith("<|endoftext|>USER: Q2 ASSISTANT:")
    assert TEMPLATES["plain"].render(["<image>\nDescribe it.", "A red circle."]) == "<image>A red circle.\n"


def runs(tok, ids, labels):
    """The conversation as (supervised?, text) runs: how a reader checks a mask by eye."""
    out = []
    for i, lab in zip(ids, labels):
        assert lab in (IGNORE_INDEX, i)
        piece = "<image>" if i == IMAGE_TOKEN_INDEX else tok.tk.decode([i], skip_special_tokens=False)
        if out and out[-1][0] == (lab != IGNORE_INDEX):
            out[-1] = (out[-1][0], out[-1][1] + piece)
        else:
            out.append((lab != IGNORE_INDEX, piece))
    return out


TURNS = ["<image>\nWhat color is the circle?", "It is red.", "How many?", "Three."]


@pytest.mark.parametrize("name", ["phi", "qwen", "stablelm", "v1", "vicuna_v1", "llava_v1", "plain"])
def test_label_masks_hand_written(name, llama_tok):
    # Supervised: each answer from the token holding its leading space, and each closing end-of-turn
    # token. Never the system prompt, user turns, "ASSISTANT:", image positions or BOS (§3.5).
    family = {"phi": "phi", "qwen": "qwen", "stablelm": "stablelm", "plain": "phi"}.get(name, "llama")
    tok = llama_tok if family == "llama" else make_tok(family, ["<|endoftext|>", "<|extra_0|>", "<|reg0|>"])
    system = SYSTEM_LLAVA if name == "llava_v1" else SYSTEM
    e, bos = ("</s>", "<s>") if family == "llama" else ("<|endoftext|>", "")
    if name == "plain":
        turns, want = TURNS[:2], [(False, "<image>"), (True, "It is red.\n")]
    else:
        turns, want = TURNS, [(False, f"{bos}{system} USER: <image>\nWhat color is the circle? ASSISTANT:"),
                              (True, f" It is red.{e}"), (False, "USER: How many? ASSISTANT:"), (True, f" Three.{e}")]
    ids, labels = tokenize_conversation(tok, TEMPLATES[name], turns)
    assert runs(tok, ids, labels) == want
    assert ids == tok.tokenize_with_images(TEMPLATES[name].render(turns))    # the ids are the full string's
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    if name != "plain":     # an image position is never a target, even inside an answer (the dataset rejects those)
        ids2, labels2 = tokenize_conversation(tok, TEMPLATES[name], ["Q", "see <image> here"])
        k = ids2.index(IMAGE_TOKEN_INDEX)
        assert labels2[k] == IGNORE_INDEX and labels2[k + 1] != IGNORE_INDEX
    if name != "plain":
        first = next(i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX)
        assert tok.tk.id_to_token(first).startswith("Ġ")          # " It": the space went with the answer
        assert labels.count(tok.eos_id) == 2                       # both closing end-of-turn tokens


def original_labels(tok, tpl, turns):
    """MoE-LLaVA's preprocess_phi (no BOS) / preprocess_v1 (BOS) arithmetic, written from §3.5."""
    conv = tpl.render(turns)
    ids = tok.tokenize_with_images(conv)
    labels, bos = list(ids), tok.bos_id is not None
    cur = 1 if bos else 0
    labels[:cur] = [IGNORE_INDEX] * cur
    sep = tpl.sep + tpl.roles[1] + ": "
    for rou in conv.split(tpl.sep2):
        if rou == "":
            break
        instr, _ = rou.split(sep)
        round_len = len(tok.tokenize_with_images(rou)) + (0 if bos else 1)
        instr_len = len(tok.tokenize_with_images(instr + sep)) - (2 if bos else 1)
        labels[cur:cur + instr_len] = [IGNORE_INDEX] * instr_len
        cur += round_len
    assert cur == len(ids), "the original would print 'tokenization mismatch' and mask the whole sample"
    return ids, labels


CONVERSATIONS = [TURNS, ["Q?", "3"], ["<image>\nA long question with words?", "yes", "and?", "The answer is 3.", "ok", "no"],
                 ["What is 1 plus 2?", "3\nwith a new line"]]


@pytest.mark.parametrize("name", ["phi", "v1"])
def test_masks_equal_original_arithmetic(name, phi_tok, llama_tok):
    tok = phi_tok if name == "phi" else llama_tok
    for turns in CONVERSATIONS:
        assert tokenize_conversation(tok, TEMPLATES[name], turns) == original_labels(tok, TEMPLATES[name], turns)


def test_segments_encoded_alone_concatenate_to_the_full_encoding(phi_tok):
    # The property the original's "-1" relies on, for a byte-level BPE like phi/qwen/stablelm.
    for turns in CONVERSATIONS:
        segs = TEMPLATES["phi"].segments(turns)
        alone = [i for text, _ in segs for i in phi_tok.encode_spans(text)[0]]
        assert alone == phi_tok.encode_spans("".join(t for t, _ in segs))[0]


@pytest.fixture(scope="module")
def merging_tok():
    # No pre-tokenizer: BPE learns merges across ": " and the answer, so a token straddles the boundary
    import tokenizers
    from tokenizers import models, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.train_from_iterator([SYSTEM + " USER: Q ASSISTANT: Yes"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False))
    return Tokenizer(tk, "phi")


def test_token_mismatch_is_reported_never_silent(merging_tok, tmp_path):
    with pytest.raises(DataError) as e:
        tokenize_conversation(merging_tok, TEMPLATES["phi"], ["Q", "Yes"])
    assert e.value.reason == "token_mismatch"
    recs = [{"id": "ok", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "Yes"}]}]
    ds = LlavaJsonDataset(DataConfig(image_size=8), merging_tok, records=recs)
    skip = ds[0]
    assert isinstance(skip, Skip) and skip.reason == "token_mismatch" and ds.stats.counts() == {"token_mismatch": 1}
    with pytest.raises(DataError, match="token_mismatch.*id=ok"):
        LlavaJsonDataset(DataConfig(image_size=8, strict=True), merging_tok, records=recs)[0]


def test_template_must_match_tokenizer(phi_tok, llama_tok):
    with pytest.raises(ValueError, match="not its eos"):
        LlavaJsonDataset(DataConfig(template="phi", tokenizer_family="llama"), llama_tok, records=[])
    with pytest.raises(ValueError, match="not its eos"):
        LlavaJsonDataset(DataConfig(template="v1"), phi_tok, records=[])
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="mpt")

# -----------------------------------------------------------------------------
# Images

ASPECTS = [(40, 23), (23, 40), (31, 31), (57, 18), (7, 30), (27, 24)]   # wide, tall, square, extreme, upscaled, odd crop


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def expand2square_reference(img, bg):
    """§3.6 as written: paste centred on a new max(W, H) square of the background colour."""
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, bg)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def test_expand_to_square():
    for w, h in ASPECTS:
        img = noise_image(w, h)
        ours = data.expand_to_square(img, (122, 116, 104))
        assert np.array_equal(np.asarray(ours), np.asarray(expand2square_reference(img, (122, 116, 104))))
    assert tuple(int(m * 255) for m in data.CLIP_MEAN) == (122, 116, 104)        # §3.6's fill colours
    assert tuple(int(m * 255) for m in data.SIGLIP_MEAN) == (127, 127, 127)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_images_match_transformers(kind, aspect):
    # Tolerance 1e-5 (float32 rounding): each backend does the same uint8 resize as its transformers
    # counterpart. "pil" vs *ImageProcessorPil (PIL bicubic: transformers 4.x's processor, which
    # MoE-LLaVA trained with); "tensor" vs *ImageProcessor (torchvision bicubic on uint8, transformers 5).
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, SiglipImageProcessor, SiglipImageProcessorPil
    S = 24
    if kind == "clip":
        mean, std = data.CLIP_MEAN, data.CLIP_STD
        kw = dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, do_center_crop=True)
        procs = {"pil": CLIPImageProcessorPil, "tensor": CLIPImageProcessor}
    else:
        mean, std = data.SIGLIP_MEAN, data.SIGLIP_STD
        kw = dict(size={"height": S, "width": S})
        procs = {"pil": SiglipImageProcessorPil, "tensor": SiglipImageProcessor}
    kw.update(resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
              image_mean=list(mean), image_std=list(std), do_convert_rgb=True)
    out = {}
    for backend, cls in procs.items():
        proc, cfg = cls(**kw), DataConfig(image_processor=kind, image_size=S, image_aspect=aspect, resize_backend=backend)
        for k, (w, h) in enumerate(ASPECTS):
            img = noise_image(w, h, seed=k)
            inp = expand2square_reference(img, tuple(int(m * 255) for m in mean)) if aspect == "pad" else img
            ref = proc(images=inp, return_tensors="pt")["pixel_values"][0]
            out[backend, k] = ours = process_image(img, cfg)
            assert ours.shape == (3, S, S) and ours.dtype == torch.float32
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=f"{backend} {w}x{h}")
    # The two backends' bicubics differ (measured on these noise images): by at most 1/255 when both
    # axes scale by the same factor (CLIP, or any padded image); where one axis is upscaled and the
    # other downscaled (SigLIP on a non-square image) by up to 18/255 on under 4% of the pixels.
    for k, (w, h) in enumerate(ASPECTS):
        levels = ((out["pil", k] - out["tensor", k]) * torch.tensor(std)[:, None, None] * 255).abs()   # [3, S, S]
        if kind == "clip" or aspect == "pad" or w == h:
            assert levels.max() <= 1.01
        else:
            assert levels.max() <= 24 and (levels > 1.01).float().mean() <= 0.05


def test_process_image_converts_mode():
    cfg = DataConfig(image_size=16)
    grey, rgba = Image.new("L", (20, 10), 200), Image.new("RGBA", (20, 10), (200, 200, 200, 255))
    torch.testing.assert_close(process_image(grey, cfg), process_image(rgba, cfg))

# -----------------------------------------------------------------------------
# LLaVA JSON dataset

def conv(*values):
    return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]


def save_png(path, w=20, h=12, seed=0):
    noise_image(w, h, seed).save(path)


@pytest.fixture
def folder(tmp_path):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png", 12, 20, 1)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    noise_image(30, 30).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return tmp_path


def dataset(folder, tok, records, **kw):
    return LlavaJsonDataset(DataConfig(image_folder=str(folder), image_size=16, **kw), tok, records=records)


GOOD = [{"id": "img", "image": "a.png", "conversations": conv("<image>\nWhat color is the circle?", "It is red.")},
        {"id": "txt", "conversations": conv("What is 1 plus 2?", "3", "And 2 plus 2?", "4")},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": conv("<image>\n<image>\nSame?", "no")}]


def test_dataset_good_samples(folder, phi_tok):
    path = folder / "train.json"
    path.write_text(json.dumps(GOOD))
    ds = LlavaJsonDataset(DataConfig(data_path=str(path), image_folder=str(folder), image_size=16), phi_tok)
    assert len(ds) == 3 and not ds.stats.skipped
    assert ds.modality_lengths == [9, -11, 4]          # whitespace words, signed by modality
    for k, n_img in enumerate((1, 0, 2)):
        s = ds[k]
        assert s["images"].shape == (n_img, 3, 16, 16) and s["index"] == k and not s["truncated"]
        assert s["input_ids"].shape == s["labels"].shape and s["input_ids"].dtype == torch.long
        assert (s["input_ids"] == IMAGE_TOKEN_INDEX).sum() == n_img
        assert (s["labels"][s["input_ids"] == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
        assert (s["labels"] != IGNORE_INDEX).any()
    torch.testing.assert_close(ds[0]["images"][0], process_image(Image.open(folder / "a.png"), ds.cfg))
    torch.testing.assert_close(ds[2]["images"][1], process_image(Image.open(folder / "b.png"), ds.cfg))
    assert ds.stats.report().startswith("data: 3 records, 0 skipped, 0 truncated")


LONG = " ".join(["word"] * 60)
# (record, reason, config overrides, found when the JSON is loaded (True) or when the sample is read)
BAD = {
    "missing_image": ({"image": "nope.png", "conversations": conv("<image>\nQ", "A")}, "missing_image", {}, True),
    "missing_image_lazy": ({"image": "nope.png", "conversations": conv("<image>\nQ", "A")}, "missing_image",
                           {"check_images_exist": False}, False),
    "garbage_image": ({"image": "garbage.png", "conversations": conv("<image>\nQ", "A")}, "bad_image", {}, False),
    "truncated_image": ({"image": "truncated.png", "conversations": conv("<image>\nQ", "A")}, "bad_image", {}, False),
    "no_conversations": ({"image": "a.png"}, "malformed_conversation", {}, True),
    "empty_conversations": ({"conversations": []}, "malformed_conversation", {}, True),
    "conversations_not_list": ({"conversations": "Q A"}, "malformed_conversation", {}, True),
    "starts_with_gpt": ({"conversations": conv("Q", "A")[::-1]}, "malformed_conversation", {}, True),
    "two_humans": ({"conversations": [conv("Q")[0], conv("Q2")[0], conv("Q", "A")[1]]}, "malformed_conversation", {}, True),
    "unknown_role": ({"conversations": [{"from": "user", "value": "Q"}, conv("Q", "A")[1]]}, "malformed_conversation",
                     {}, True),
    "turn_not_dict": ({"conversations": ["Q", "A"]}, "malformed_conversation", {}, True),
    "value_not_str": ({"conversations": conv(3, "A")}, "malformed_conversation", {}, True),
    "empty_answer": ({"conversations": conv("Q", "  ")}, "malformed_conversation", {}, True),
    "ends_with_human": ({"conversations": conv("Q", "A", "Q2")}, "malformed_conversation", {}, True),
    "image_in_answer": ({"image": "a.png", "conversations": conv("Q", "<image>")}, "malformed_conversation", {}, True),
    "image_without_token": ({"image": "a.png", "conversations": conv("Q", "A")}, "image_count_mismatch", {}, True),
    "token_without_image": ({"conversations": conv("<image>\nQ", "A")}, "image_count_mismatch", {}, True),
    "two_tokens_one_image": ({"image": ["a.png"], "conversations": conv("<image><image>\nQ", "A")}, "image_count_mismatch",
                             {}, True),
    "image_field_int": ({"image": 7, "conversations": conv("<image>\nQ", "A")}, "bad_record", {}, True),
    "image_list_bad": ({"image": ["a.png", None], "conversations": conv("<image><image>\nQ", "A")}, "bad_record", {}, True),
    "record_not_object": (["<image>", "A"], "bad_record", {}, True),
    "too_many_images": ({"image": ["a.png", "b.png"], "conversations": conv("<image><image>\nQ", "A")}, "too_many_images",
                        {"max_images": 1}, True),
    "plain_without_image": ({"conversations": conv("Describe.", "A cat.")}, "malformed_conversation",
                            {"template": "plain"}, True),
    "too_long_skip": ({"conversations": conv(LONG, "A")}, "too_long", {"max_length": 60, "overlength": "skip"}, False),
    "truncation_cuts_image": ({"image": "a.png", "conversations": conv(LONG + "<image>", "A")}, "truncation_cuts_image",
                              {"max_length": 60}, False),
    "nothing_left_after_truncation": ({"image": "a.png", "conversations": conv("<image>" + LONG, "A")}, "no_supervised_tokens",
                                      {"max_length": 60}, False),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_counted_skip_or_a_strict_error(case, folder, phi_tok):
    rec, reason, kw, at_load = BAD[case]
    if isinstance(rec, dict):
        rec = {"id": case, **rec}
    records = [GOOD[0], rec, {**GOOD[0], "id": "img2"}]      # good neighbours under every template and length here
    ds = dataset(folder, phi_tok, records, **kw)
    good_turns = [t["value"] for t in GOOD[0]["conversations"]]
    assert len(tokenize_conversation(phi_tok, TEMPLATES["phi"], good_turns)[0]) < 60
    if at_load:
        assert len(ds) == 2 and ds.keep == [0, 2]
    else:
        assert len(ds) == 3
        skip = ds[1]
        assert isinstance(skip, Skip) and (skip.index, skip.reason) == (1, reason)
        batch = collate([ds[0], skip, ds[2]], phi_tok.pad_id)       # dropped, and carried for the report
        assert batch["input_ids"].shape[0] == 2 and batch["skipped"] == [skip] and batch["index"] == [0, 2]
    assert ds.stats.counts() == {reason: 1}
    rid = case if isinstance(rec, dict) else "1"
    assert f"skipped {reason}: 1, e.g. #1 id={rid}:" in ds.stats.report()
    assert isinstance(ds[0], dict) and isinstance(ds[len(ds) - 1], dict)     # neighbours unaffected, nothing substituted
    with pytest.raises(DataError, match=f"{reason}: record #1 \\(id={rid}\\)"):
        strict = dataset(folder, phi_tok, records, strict=True, **kw)
        strict[1]


def test_truncation_is_counted(folder, phi_tok):
    recs = [{"id": "long", "image": "a.png", "conversations": conv("<image>\nQ", LONG)}]
    ds = dataset(folder, phi_tok, recs, max_length=60)
    s = ds[0]
    assert s["truncated"] and len(s["input_ids"]) == len(s["labels"]) == 60
    assert (s["labels"] != IGNORE_INDEX).any() and ds.stats.truncated == {0}
    assert "1 truncated" in ds.stats.report()
    assert collate([s], phi_tok.pad_id)["truncated"] == [0]


def test_stats_merge_batches_once_per_record():
    stats = data.DataStats(n_records=10)
    batch = {"skipped": [Skip(3, "x", "bad_image", "boom")], "truncated": [5]}
    for _ in range(3):                  # the same record seen by a worker in three epochs
        stats.update(batch)
    assert stats.counts() == {"bad_image": 1} and stats.truncated == {5}

# -----------------------------------------------------------------------------
# Batching

def test_collate_right_padding_for_training(folder, phi_tok):
    ds = dataset(folder, phi_tok, GOOD)
    samples = [ds[0], ds[1], ds[2]]                      # 1, 0 and 2 images
    b = collate(samples, phi_tok.pad_id)
    lens = [len(s["input_ids"]) for s in samples]
    B, T = 3, max(lens)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (B, T)
    for k, s in enumerate(samples):
        n = lens[k]
        assert torch.equal(b["input_ids"][k, :n], s["input_ids"]) and (b["input_ids"][k, n:] == phi_tok.pad_id).all()
        assert torch.equal(b["labels"][k, :n], s["labels"]) and (b["labels"][k, n:] == IGNORE_INDEX).all()
        assert b["attention_mask"][k].tolist() == [1] * n + [0] * (T - n)
    assert b["image_counts"].tolist() == [1, 0, 2]
    torch.testing.assert_close(b["images"], torch.cat([ds[0]["images"], ds[2]["images"]]))   # flat, in sample order
    empty = collate([Skip(0, "a", "bad_image")], phi_tok.pad_id, image_size=16)
    assert empty["input_ids"].shape == (0, 0) and empty["images"].shape == (0, 3, 16, 16) and len(empty["skipped"]) == 1


def test_collate_left_padding_for_generation(phi_tok):
    prompts = [{"input_ids": [5, 6, 7], "images": torch.zeros(1, 3, 4, 4)},
               {"input_ids": [8], "images": torch.zeros(0, 3, 4, 4)}]
    b = collate(prompts, pad_id=0, padding_side="left")
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in b and b["images"].shape == (1, 3, 4, 4) and b["image_counts"].tolist() == [1, 0]


def llava_modality_grouped(lengths, batch_size, world_size, g):
    """LLaVA's get_modality_length_grouped_indices (§3.7), with `g` used for every draw."""
    def split_even(indices, lens, n):
        if len(indices) % n:
            return [indices[i::n] for i in range(n)]
        per, chunks, totals = len(indices) // n, [[] for _ in range(n)], [0] * n
        for i in indices:
            c = totals.index(min(totals))
            chunks[c].append(i)
            totals[c] += lens[i]
            if len(chunks[c]) == per:
                totals[c] = float("inf")
        return chunks

    def length_grouped(lens):
        idx = torch.randperm(len(lens), generator=g)
        M = world_size * batch_size
        mbs = [sorted(idx[i:i + M].tolist(), key=lambda i: lens[i], reverse=True) for i in range(0, len(lens), M)]
        return [i for mb in mbs for chunk in split_even(mb, lens, world_size) for i in chunk]

    if all(x > 0 for x in lengths) or all(x < 0 for x in lengths):
        return length_grouped([abs(x) for x in lengths])
    mm = [(i, x) for i, x in enumerate(lengths) if x > 0]
    lang = [(i, -x) for i, x in enumerate(lengths) if x < 0]
    mm_shuffle = [mm[i][0] for i in length_grouped([x for _, x in mm])]
    lang_shuffle = [lang[i][0] for i in length_grouped([x for _, x in lang])]
    M = world_size * batch_size
    mm_mbs = [mm_shuffle[i:i + M] for i in range(0, len(mm_shuffle), M)]
    lang_mbs = [lang_shuffle[i:i + M] for i in range(0, len(lang_shuffle), M)]
    additional = mm_mbs[-1] + lang_mbs[-1]
    mbs = mm_mbs[:-1] + lang_mbs[:-1]
    mbs = [mbs[i] for i in torch.randperm(len(mbs), generator=g)]
    return [i for mb in mbs + [sorted(additional)] for i in mb]


def random_lengths(n, seed, text_only=0.3):
    rng = np.random.default_rng(seed)
    return [int(x) * (-1 if rng.random() < text_only else 1) for x in rng.integers(1, 200, n)]


@pytest.mark.parametrize("world_size,batch_size,n,text_only",
                         [(1, 4, 37, 0.3), (2, 3, 50, 0.3), (4, 2, 64, 0.5), (2, 4, 30, 0.0)])
def test_sampler_global_order_is_llavas(world_size, batch_size, n, text_only):
    lengths = random_lengths(n, seed=n, text_only=text_only)
    s = ModalityLengthGroupedSampler(lengths, batch_size, world_size, rank=0, seed=7)
    s.set_epoch(2)
    ours = [i for mb in s.megabatches() for i in mb]
    assert ours == llava_modality_grouped(lengths, batch_size, world_size, torch.Generator().manual_seed(7 + 2))


def test_sampler_shards_ranks():
    W, B, lengths = 2, 3, random_lengths(41, seed=1)
    shards = [ModalityLengthGroupedSampler(lengths, B, W, rank=r, seed=0) for r in range(W)]
    lists = [list(s) for s in shards]
    assert [len(x) for x in lists] == [len(s) for s in shards] == [21, 21]        # ceil(41 / 2) each
    assert set(lists[0]) | set(lists[1]) == set(range(41))
    assert len(lists[0]) + len(lists[1]) - 41 == 1                                 # one wrapped-round repeat
    n_full = len(shards[0].megabatches()) - 1                                      # all but the mixed tail
    for x in lists:
        for c in range(n_full):                                                    # each rank's step is one modality
            assert len({lengths[i] > 0 for i in x[c * B:(c + 1) * B]}) == 1
    again = ModalityLengthGroupedSampler(lengths, B, W, rank=0, seed=0)
    assert list(again) == lists[0]                                                 # a function of (seed, epoch)
    again.set_epoch(1)
    assert list(again) != lists[0]
    plain = ModalityLengthGroupedSampler(lengths, B, W, rank=1, seed=0, group_by_modality_length=False)
    assert len(list(plain)) == 21


def test_sampler_resumes_at_the_next_sample():
    lengths = random_lengths(30, seed=3)
    s = ModalityLengthGroupedSampler(lengths, 4, 2, rank=1, seed=5)
    s.set_epoch(3)
    full = list(s)
    it = iter(s)
    taken = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(s.state_dict()))             # survives a JSON checkpoint
    r = ModalityLengthGroupedSampler(lengths, 4, 2, rank=1, seed=5)
    r.load_state_dict(state)
    rest = list(r)
    assert taken + rest == full and len(r) == len(full) - 7
    r2 = ModalityLengthGroupedSampler(lengths, 4, 2, rank=1, seed=5)
    r2.load_state_dict(s.state_dict(samples_consumed=4))      # workers prefetched; the loop took 4
    assert list(r2) == full[4:]
    it = iter(r2)
    more = [next(it) for _ in range(3)]
    r3 = ModalityLengthGroupedSampler(lengths, 4, 2, rank=1, seed=5)
    r3.load_state_dict(r2.state_dict())                        # resuming a resumed run
    assert more == full[4:7] and list(r3) == full[7:]
    with pytest.raises(ValueError, match="world_size"):
        ModalityLengthGroupedSampler(lengths, 4, 4, rank=1, seed=5).load_state_dict(state)
    r.set_epoch(4)                                             # the next epoch starts from its beginning
    assert len(list(r)) == len(full)

# -----------------------------------------------------------------------------
# Synthetic dataset

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    return out, data.build_synthetic_dataset(out, seed=0, n_train=300, n_val=20, n_test=60, image_size=32)


def tree_digest(root):
    digest = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            digest[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return digest


def test_synthetic_is_deterministic(tmp_path):
    a = data.build_synthetic_dataset(str(tmp_path / "a"), seed=1, n_train=40, n_val=5, n_test=10, image_size=32)
    data.build_synthetic_dataset(str(tmp_path / "b"), seed=1, n_train=40, n_val=5, n_test=10, image_size=32)
    data.build_synthetic_dataset(str(tmp_path / "c"), seed=2, n_train=40, n_val=5, n_test=10, image_size=32)
    da, db, dc = (tree_digest(tmp_path / x) for x in "abc")
    assert da == db and len(da) > 50 and "tokenizer.json" in da
    assert da["train.json"] != dc["train.json"] and da["images/train/000000.png"] != dc.get("images/train/000000.png")
    assert set(a) >= {"train.json", "val.json", "test.json", "pretrain.json", "tokenizer.json", "meta.json"}


def test_synthetic_loads_without_skips(synthetic):
    out, paths = synthetic
    tok = Tokenizer.from_file(paths["tokenizer.json"], "phi")
    for name, template in (("train.json", "phi"), ("val.json", "phi"), ("test.json", "phi"), ("pretrain.json", "plain"),
                           ("eval/scienceqa/llava_test_CQM-A.json", "phi")):
        cfg = DataConfig(data_path=paths[name], image_folder=paths["image_folder"], image_size=32, template=template,
                         strict=True)
        ds = LlavaJsonDataset(cfg, tok)
        assert len(ds) == len(json.load(open(paths[name])))
        for k in range(0, len(ds), 7):
            s = ds[k]
            assert (s["labels"] != IGNORE_INDEX).any() and not s["truncated"]
    meta = json.load(open(paths["meta.json"]))
    assert sum(meta["splits"]["train"].values()) == 300 and set(meta["splits"]["train"]) == set(data.DOMAINS)


def test_synthetic_tokenizer_never_spells_image(synthetic):
    tok = Tokenizer.from_file(synthetic[1]["tokenizer.json"], "phi")
    assert (tok.eos_id, tok.pad_id) == (tok.tk.token_to_id("<|endoftext|>"), tok.tk.token_to_id("<|extra_0|>"))
    pieces = [tok.tk.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)]
    assert not any("<image" in p or "image>" in p for p in pieces)
    assert tok.tk.token_to_id("<image>") is None
    text = TEMPLATES["phi"].render(["<image>\nWhat color is the circle in the top left?", "red"])
    assert len(tok.tokenize_with_images(text)) < len(text) / 2.5               # the vocabulary fits the data


def centre(cell, size):
    return int((cell % 2 + 0.5) * size / 2), int((cell // 2 + 0.5) * size / 2)


def test_synthetic_answers_agree_with_pixels(synthetic):
    out, paths = synthetic
    recs = json.load(open(paths["train.json"])) + json.load(open(paths["test.json"]))
    checked = Counter()
    for r in recs:
        if "scene" not in r:
            assert r["domain"] == "text" and "image" not in r
            assert not any("<image>" in t["value"] for t in r["conversations"])
            continue
        img = np.asarray(Image.open(os.path.join(paths["image_folder"], r["image"])))
        scene, by_cell = r["scene"], {o["cell"]: o for o in r["scene"]["objects"]}
        for cell in ({0, 1, 2, 3} if "text" not in scene else {2, 3}):
            x, y = centre(cell, 32)
            want = data.COLOURS[by_cell[cell]["colour"]] if cell in by_cell else (250, 250, 250)
            assert tuple(img[y, x]) == want, (r["id"], cell)
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
            q, a = q["value"].replace("<image>\n", ""), a["value"]
            if m := re.match(r"What color is the (\w+) in the ([\w ]+)\?\n", q):
                o = by_cell[data.CELLS.index(m[2])]
                assert o["shape"] == m[1] and a == o["colour"]
                checked["color"] += 1
            elif m := re.match(r"How many (\w+)s are there\?", q):
                assert a == str(sum(m[1] in ("shape", o["shape"]) for o in scene["objects"]))
                checked["count"] += 1
            elif m := re.match(r"Is there a (\w+) (\w+) in the image\?", q):
                assert a == ("yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in scene["objects"]) else "no")
                checked["pope"] += 1
            elif m := re.match(r"Where is the (\w+) (\w+)\?", q):
                assert [data.CELLS[o["cell"]] for o in scene["objects"] if (o["colour"], o["shape"]) == (m[1], m[2])] == [a]
                checked["spatial"] += 1
            elif q.startswith(("What is written", "What word")):
                assert a == scene["text"]
                checked["ocr"] += 1
    assert min(checked.values()) >= 10 and len(checked) == 5


def test_synthetic_domains_share_answer_tokens(synthetic):
    recs = json.load(open(synthetic[1]["train.json"]))
    answers = {}
    for r in recs:
        answers.setdefault(r["domain"], set()).update(t["value"] for t in r["conversations"][1::2])
    assert answers["count"] & answers["ocr"] & answers["text"]         # digits: counted, read, computed
    assert {"red", "blue"} <= answers["color"] & answers["ocr"]          # colour words: seen vs read
    assert {"yes", "no"} <= answers["pope"] & answers["spatial"] & answers["ocr"]
    assert answers["mc"] == {"A", "B", "C"}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_synthetic_eval_files(synthetic):
    out, p = synthetic
    ev = lambda name: os.path.join(out, "eval", name)  # noqa: E731
    questions = read_jsonl(ev("pope/llava_pope_test.jsonl"))
    for cat in data.POPE_CATEGORIES:                   # labels align with the questions by order (§5.2)
        qs = [q for q in questions if q["category"] == cat]
        labels = read_jsonl(ev(f"pope/coco_pope_{cat}.json"))
        assert [q["question_id"] for q in qs] == [x["question_id"] for x in labels] and len(qs) > 10
        assert all(q["text"] == x["text"] + data.SHORT for q, x in zip(qs, labels))
        assert [x["label"] for x in labels] == ["yes", "no"] * (len(labels) // 2)   # one of each per image
        assert all(os.path.isfile(os.path.join(p["image_folder"], x["image"])) for x in labels)
    problems, splits = json.load(open(ev("scienceqa/problems.json"))), json.load(open(ev("scienceqa/pid_splits.json")))
    assert set(splits["test"]) == set(problems) and splits["train"] == []
    assert {pr["image"] is None for pr in problems.values()} == {True, False}    # SQA-IMG is a strict subset
    sqa = {r["id"]: r for r in json.load(open(ev("scienceqa/llava_test_CQM-A.json")))}
    for pid, pr in problems.items():
        human, gpt = sqa[pid]["conversations"]
        assert gpt["value"] == "ABC"[pr["answer"]] and ("<image>" in human["value"]) == (pr["image"] is not None)
        assert f"\nA. {pr['choices'][0]}\nB. {pr['choices'][1]}" in human["value"] and pr["split"] == "test"
    gqa = read_jsonl(ev("gqa/llava_gqa_testdev_balanced.jsonl"))
    gold = json.load(open(ev("gqa/testdev_balanced_questions.json")))
    assert [q["question_id"] for q in gqa] == list(gold) and all(q["text"].endswith(data.SHORT) for q in gqa)
    tv = read_jsonl(ev("textvqa/llava_textvqa_val_v051_ocr.jsonl"))
    tv_gold = json.load(open(ev("textvqa/TextVQA_0.5.1_val.json")))["data"]
    assert len(tv) == len(tv_gold) > 0 and all(len(g["answers"]) == 10 and g["answers"][0] in data.WORDS for g in tv_gold)
    for q, g in zip(tv, tv_gold):
        assert q["question_id"] == g["question_id"] and q["text"] == g["question"] + data.SHORT


def test_tokenizer_load_from_dir_or_file(tmp_path):
    from data import Tokenizer, train_bpe_tokenizer
    tk = train_bpe_tokenizer(["a chat between a user and an assistant", "red blue green"], 300,
                             ["<|endoftext|>", "<|extra_0|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    a, b = Tokenizer.load(str(tmp_path), "phi"), Tokenizer.load(str(tmp_path / "tokenizer.json"), "phi")
    assert a.encode("red chat") == b.encode("red chat") and a.eos_id == b.eos_id
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.model, vocab.json \+ merges.txt, \*.tiktoken or tokenizer.json"):
        (tmp_path / "empty").mkdir() or Tokenizer.load(str(tmp_path / "empty"), "phi")


# -----------------------------------------------------------------------------
# The data config a checkpoint carries (issue 14, item 6): eval preprocesses and tokenizes as training did

# Every DataConfig field that changes how a sample is tokenized, cut or preprocessed.
PREPROCESSING = ("template", "tokenizer_family", "image_processor", "image_size", "image_aspect", "resize_backend",
                 "image_mean", "image_std", "max_length", "overlength", "max_images")


def test_checkpoint_carries_the_whole_data_config_and_eval_reads_it(synthetic, tmp_path, capsys):
    import eval as ev
    import train
    from model import VisionConfig
    out, paths = synthetic
    chosen = ["--data.resize_backend=tensor", "--data.image_mean=[0.25,0.5,0.75]", "--data.image_std=[0.2,0.3,0.4]",
              "--data.image_aspect=square", "--data.max_length=300", "--data.overlength=skip", "--data.max_images=3"]
    cfg = train.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.toml"), chosen)
    saved = train.main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.toml"), *chosen,
                        f"--data.data_path={paths['train.json']}", f"--data.image_folder={paths['image_folder']}",
                        f"--data.tokenizer_path={paths['tokenizer.json']}", "--train.max_steps=1",
                        "--train.global_batch_size=4", f"--train.out_dir={tmp_path / 'run'}"])
    config = json.load(open(os.path.join(saved, "config.json")))
    capsys.readouterr()
    got = ev.checkpoint_data_config(config, VisionConfig(image_size=32, patch_size=8))
    assert {k: getattr(got, k) for k in PREPROCESSING} == {k: getattr(cfg.data, k) for k in PREPROCESSING}
    assert capsys.readouterr().err == ""                                # nothing missing: no warning


def test_old_checkpoint_data_config_falls_back_with_a_warning(capsys):
    """Checkpoints saved before these fields were: the defaults, and one line saying which were missing."""
    import eval as ev
    from model import VisionConfig
    old = {"format": "moe-vlm", "data": {"template": "phi", "tokenizer_family": "phi", "image_processor": "siglip",
                                         "image_size": 32, "image_aspect": "pad", "max_length": 256}}
    got = ev.checkpoint_data_config(old, VisionConfig(image_size=32, patch_size=8))
    assert (got.image_processor, got.max_length, got.resize_backend) == ("siglip", 256, "pil")
    assert (got.image_mean, got.image_std) == (data.SIGLIP_MEAN, data.SIGLIP_STD)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(k in err for k in ("resize_backend", "image_mean", "image_std", "overlength",
                                                           "max_images"))
