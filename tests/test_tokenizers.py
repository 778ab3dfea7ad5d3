"""Tokenizer folders as LLaVA / MoE-LLaVA checkpoints ship them (issue 14, item 6).

Those projects load their tokenizer with use_fast=False (transformers 4.37 for MoE-LLaVA) and save the slow
files: a Llama / Vicuna checkpoint has a SentencePiece `tokenizer.model`, a Phi-2 one GPT-2-style `vocab.json`
+ `merges.txt` + `added_tokens.json`. data.Tokenizer.load must read both and give the slow tokenizers' ids,
and eval.py must load them with that same loader.

The references below are written from the rules (SentencePiece BPE with transformers' legacy=True chunking;
GPT-2 byte-level BPE), not taken from transformers 5, whose conversion of a tokenizer.model differs from the
slow tokenizer (" leading" loses one "▁"). The SentencePiece reference is first checked against the
sentencepiece engine itself. Tiny tokenizer files are trained here; nothing is downloaded.
"""
import io
import json
import math
import os
import random

import pytest
import regex                      # GPT-2's \p{L} pattern; installed with transformers
import sentencepiece as spm
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, trainers

import eval as ev
from data import TEMPLATES, Tokenizer, tokenize_conversation
from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaConfig, LlavaModel, LMConfig, VisionConfig

CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions.",
          "USER: What is in the picture? ASSISTANT: A red square and a blue circle.",
          "def f(x):    return x  # indented    code    with  runs   of spaces",
          "        eight spaces, then    four, then  two.",
          "What colour is the shape? Describe the image in detail. Look at this picture."] * 20

# Strings with the cases where tokenizers disagree: "<image>\n" inside a turn and a trailing "<image>" (data.py
# encodes the text between placeholders chunk by chunk), runs of spaces, leading and trailing spaces, tabs and
# newlines, characters outside the vocabulary (byte fallback), and the family's end-of-turn inside the text.
# EOS stands for that end-of-turn ("</s>" for Llama, "<|endoftext|>" for Phi-2).
CASES = ["USER: <image>\nWhat is in the  picture? ASSISTANT:",
         "Look at this: <image>",
         "<image>",
         "<image>\n<image>\ntwo images",
         "a  b   c    d     e      f",
         "   three leading spaces",
         " one leading space",
         "trailing spaces   ",
         "café naïve 日本語 🙂 Ünïcödé",
         "tabs\tand\t\tnewlines\n\nend",
         "answer.EOSUSER: next EOS again",
         ""]


def conversation(eos):
    template = TEMPLATES["vicuna_v1" if eos == "</s>" else "phi"]
    turns = ["<image>\nWhat is in the  picture?", "A red square.", "And   the colour?", "Blue."]
    return template, turns, template.render(turns)


def with_images(encode, text, bos=None):
    """MoE-LLaVA's tokenizer_image_token (§3.4): split on "<image>", encode each chunk alone, join with -200."""
    ids = [] if bos is None else [bos]
    for k, chunk in enumerate(text.split("<image>")):
        ids += ([IMAGE_TOKEN_INDEX] if k else []) + encode(chunk)
    return ids


def split_added(text, added):
    """The slow tokenizers' split at added tokens (transformers' Trie): the longest one at the earliest place;
    the whitespace around them is left where it is."""
    parts, start, i = [], 0, 0
    while i < len(text):
        hit = max((t for t in added if text.startswith(t, i)), key=len, default=None)
        if hit is None:
            i += 1
            continue
        parts += [text[start:i], hit]
        i = start = i + len(hit)
    return [p for p in parts + [text[start:]] if p]

# -----------------------------------------------------------------------------
# SentencePiece (Llama / Vicuna)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama-shaped tokenizer.model: BPE, byte fallback, identity normalizer that keeps whitespace, a dummy
    prefix, whitespace-only pieces, <unk> <s> </s> = 0 1 2; with the json files a Llama checkpoint has, and an
    added [PAD] after the pieces, as LLaVA's v0 recipe adds one."""
    folder = tmp_path_factory.mktemp("llama")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe", vocab_size=400, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": 400}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                                "pad_token": "[PAD]"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


class SentencePieceRules:
    """Token ids of transformers' slow LlamaTokenizer with legacy=True, from the rules:
      * the text is cut at the added tokens (<unk> <s> </s> and added_tokens.json's), each kept whole;
      * every other piece is encoded on its own by SentencePiece: " " -> "▁", and a "▁" put in front of the
        piece (add_dummy_prefix), so a piece after </s> or after "<image>" starts with "▁" too;
      * BPE over the whole piece: merge the adjacent pair whose concatenation is a vocabulary piece of the
        highest score (the leftmost on a tie), until none is; a symbol left that is no piece becomes the
        <0xXX> pieces of its UTF-8 bytes."""

    def __init__(self, model_file):
        sp = self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        ids = range(sp.get_piece_size())
        self.id = {sp.id_to_piece(i): i for i in ids}
        self.special = [sp.id_to_piece(i) for i in ids if sp.is_control(i) or sp.is_unknown(i)]
        added = json.loads((model_file.parent / "added_tokens.json").read_text())
        self.id |= added
        self.special += list(added)
        self.score = {sp.id_to_piece(i): sp.get_score(i) for i in ids
                      if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}

    def bpe(self, text):
        if not text:
            return []
        symbols = list("▁" + text.replace(" ", "▁"))
        while True:
            pairs = [(self.score[a + b], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in self.score]
            if not pairs:
                break
            i = -max(pairs)[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return [x for s in symbols for x in ([self.id[s]] if s in self.score else
                                             [self.id[f"<0x{b:02X}>"] for b in s.encode("utf-8")])]

    def encode(self, text):
        return [x for part in split_added(text, self.special)
                for x in ([self.id[part]] if part in self.special else self.bpe(part))]


def llama_cases():
    _, _, rendered = conversation("</s>")
    return [rendered, "pad[PAD]ded [PAD] x"] + [c.replace("EOS", "</s>") for c in CASES]


def test_sentencepiece_reference_is_the_engine(llama_dir):
    """The reference's BPE gives what sentencepiece itself gives on each piece between special tokens."""
    ref = SentencePieceRules(llama_dir / "tokenizer.model")
    pieces = [p for text in llama_cases() for chunk in text.split("<image>") for p in split_added(chunk, ref.special)]
    for piece in pieces:
        assert ref.bpe(piece) == ref.sp.encode(piece), repr(piece)


@pytest.mark.parametrize("where", ["dir", "file"])
def test_llama_tokenizer_model_encodes_as_the_legacy_slow_tokenizer(llama_dir, where):
    ref = SentencePieceRules(llama_dir / "tokenizer.model")
    tok = Tokenizer.load(str(llama_dir if where == "dir" else llama_dir / "tokenizer.model"), "llama")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.vocab_size == ref.sp.get_piece_size() + 1
    for text in llama_cases():
        assert tok.tokenize_with_images(text) == with_images(ref.encode, text, bos=1), repr(text)
    # The legacy rule, spelled out.
    pieces = lambda text: [ref.sp.id_to_piece(i) for i in tok.encode(text)]  # noqa: E731
    after = pieces("ok</s>USER")[pieces("ok</s>USER").index("</s>") + 1:]
    assert after == pieces("USER") and after[0].startswith("▁")          # encoded alone after </s>: "▁" first
    assert pieces("\nWhat")[:2] == ["▁", "<0x0A>"]                      # the chunk after "<image>" in a prompt
    assert pieces(" one")[0] == "▁▁"                                     # dummy prefix + the leading space
    assert tok.tokenize_with_images("Look: <image>")[-1] == IMAGE_TOKEN_INDEX   # an empty last chunk adds nothing


def random_texts(specials, n=400, seed=0):
    """Strings from the corpus' words and characters, spaces, tabs, newlines, unknown characters, specials."""
    rng = random.Random(seed)
    words = sorted({w for line in CORPUS for w in line.split()}) + list("aeiouxyz.,?'") + ["é", "日本", "🙂", "\t", "\n"]
    seps = [" "] * 6 + ["", "  ", "   ", "    ", "\t\t", "\n"]
    return ["".join(rng.choice(words + specials if rng.random() < 0.1 else words) + rng.choice(seps)
                    for _ in range(rng.randrange(0, 12))) for _ in range(n)]


def test_llama_random_text_as_sentencepiece_and_the_rules(llama_dir):
    ref = SentencePieceRules(llama_dir / "tokenizer.model")
    tok = Tokenizer.load(str(llama_dir), "llama")
    for text in random_texts(["</s>", "<s>", "[PAD]"]):
        assert tok.encode(text) == ref.encode(text), repr(text)
        if not any(t in text for t in ref.special):
            assert tok.encode(text) == ref.sp.encode(text), repr(text)


def test_llama_tokenizer_survives_the_checkpoint_round_trip(llama_dir, tmp_path):
    """train.py saves tok.tk as tokenizer.json into each checkpoint; eval reads that file back."""
    tok = Tokenizer.load(str(llama_dir), "llama")
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.load(str(tmp_path), "llama")
    for text in llama_cases():
        assert again.tokenize_with_images(text) == tok.tokenize_with_images(text), repr(text)
    plain = [c for c in llama_cases() if not any(t in c for t in ("<image>", "</s>", "[PAD]"))]
    for text in plain:
        assert again.decode(again.encode(text)) == text


def test_llama_labels_line_up_on_sentencepiece_tokens(llama_dir):
    """v1 masking on a two-round conversation: the answers and their </s> are supervised, nothing else."""
    tok = Tokenizer.load(str(llama_dir), "llama")
    template, turns, _ = conversation("</s>")
    ids, labels = tokenize_conversation(tok, template, turns)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert kept == tok.encode("A red square.</s>") + tok.encode("Blue.</s>")     # "▁A": the space before the answer
    assert tok.decode(kept, skip_special_tokens=False) == "A red square.</s> Blue.</s>"   # decoding drops one space


@pytest.mark.parametrize("options,message", [
    (dict(model_type="unigram"), "a SentencePiece unigram model"),
    (dict(model_type="bpe"), "precompiled_charsmap.*remove_extra_whitespaces")])     # default nmt_nfkc normalizer
def test_unlike_llama_sentencepiece_models_are_refused(tmp_path, options, message):
    """They would not encode as transformers' slow tokenizer does: an error, not quietly other ids."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=120, hard_vocab_limit=False,
                                   num_threads=1, minloglevel=2, **options)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(str(tmp_path), "llama")


# -----------------------------------------------------------------------------
# GPT-2-style byte-level BPE (Phi-2)

SPACES = ["      ", "     ", "    ", "   ", "  "]          # Phi-2 adds runs of 2..31 spaces and 2..9 tabs
TABS = ["\t\t\t", "\t\t"]


@pytest.fixture(scope="module", params=["added_tokens_decoder", "added_tokens.json"])
def phi2_dir(tmp_path_factory, request):
    """A Phi-2-shaped slow tokenizer folder: vocab.json with <|endoftext|> last, merges.txt (with its
    "#version" line), the whitespace-run tokens and MoE-LLaVA's unk <|extra_0|> added after the vocabulary.
    transformers >= 4.34 lists them in tokenizer_config.json too ("added_tokens_decoder"); older saves do not."""
    folder = tmp_path_factory.mktemp("phi2")
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    added = {t: len(vocab) + k for k, t in enumerate(SPACES + TABS + ["<|extra_0|>"])}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|extra_0|>",
                "pad_token": "<|extra_0|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False, **specials}
    if request.param == "added_tokens_decoder":
        entry = lambda t, special: {"content": t, "lstrip": False, "normalized": not special, "rstrip": False,  # noqa: E731
                                    "single_word": False, "special": special}
        config["added_tokens_decoder"] = {str(vocab["<|endoftext|>"]): entry("<|endoftext|>", True),
                                          **{str(i): entry(t, t == "<|extra_0|>") for t, i in added.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def bytes_to_unicode():
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes for
    the characters from U+0100 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(0x100 + n) for n, b in enumerate(rest)}}


class GPT2Rules:
    """Token ids of GPT-2's slow byte-level BPE (Phi-2's CodeGenTokenizer), from the rules: cut the text at the
    added tokens; split the rest with GPT-2's regex; write each piece's UTF-8 bytes as characters; merge the
    adjacent pair of the lowest merges.txt rank, every occurrence left to right, until no pair has a rank."""
    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, folder):
        self.vocab = json.loads((folder / "vocab.json").read_text())
        lines = (folder / "merges.txt").read_text().split("\n")[1:-1]          # the "#version" line is not a merge
        self.rank = {tuple(line.split()): r for r, line in enumerate(lines)}
        self.added = json.loads((folder / "added_tokens.json").read_text()) | {"<|endoftext|>": self.vocab["<|endoftext|>"]}
        self.b2u = bytes_to_unicode()

    def bpe(self, word):
        parts = [self.b2u[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.rank.get(p, math.inf))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.vocab[p] for p in parts]

    def encode(self, text):
        return [x for part in split_added(text, self.added)
                for x in ([self.added[part]] if part in self.added else
                          [y for word in self.PATTERN.findall(part) for y in self.bpe(word)])]


def phi_cases():
    _, _, rendered = conversation("<|endoftext|>")
    return [rendered] + [c.replace("EOS", "<|endoftext|>") for c in CASES]


def test_phi2_slow_files_encode_as_the_slow_tokenizer(phi2_dir):
    ref = GPT2Rules(phi2_dir)
    tok = Tokenizer.load(str(phi2_dir), "phi")
    assert (tok.eos_id, tok.pad_id) == (ref.vocab["<|endoftext|>"], ref.added["<|extra_0|>"])
    assert tok.vocab_size == len(ref.vocab) + len(SPACES) + len(TABS) + 1     # <|extra_0|> is not added twice
    for text in phi_cases():
        assert tok.tokenize_with_images(text) == with_images(ref.encode, text), repr(text)
    # A run of spaces is one added token, which takes the space the next word would have had.
    assert tok.encode("a   b") == [ref.vocab["a"], ref.added["   "], ref.vocab["b"]]
    for text in phi_cases():
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_phi2_random_text_as_the_rules(phi2_dir):
    ref = GPT2Rules(phi2_dir)
    tok = Tokenizer.load(str(phi2_dir), "phi")
    for text in random_texts(["<|endoftext|>", "<|extra_0|>"]):
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_phi2_labels_line_up(phi2_dir):
    tok = Tokenizer.load(str(phi2_dir), "phi")
    template, turns, _ = conversation("<|endoftext|>")
    ids, labels = tokenize_conversation(tok, template, turns)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=False).split("<|endoftext|>") == [" A red square.", " Blue.", ""]

# -----------------------------------------------------------------------------
# One loader: eval reads a checkpoint's tokenizer as train does


def test_eval_loads_a_checkpoint_with_slow_tokenizer_files(phi2_dir, tmp_path):
    """A MoE-LLaVA Phi-2 checkpoint has no tokenizer.json: eval reads its slow files with data.py's loader."""
    ref = GPT2Rules(phi2_dir)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                          num_layers=1, num_heads=2),
                      lm=LMConfig(family="stablelm", vocab_size=512, hidden_size=32, intermediate_size=64,
                                  num_layers=1, num_heads=2, norm="layernorm"))
    ckpt = tmp_path / "ckpt"
    LlavaModel(cfg).save_pretrained(str(ckpt), {"data": {"template": "phi", "tokenizer_family": "phi", "image_size": 16}})
    for name in os.listdir(phi2_dir):
        (ckpt / name).write_bytes((phi2_dir / name).read_bytes())
    _, tok, _, _ = ev.load_model(ev.EvalConfig(checkpoint=str(ckpt)), torch.device("cpu"))
    for text in phi_cases():
        assert tok.tokenize_with_images(text) == with_images(ref.encode, text), repr(text)
