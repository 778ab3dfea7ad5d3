"""data.py: everything between files on disk and a training batch.

Top to bottom: tokenizers (tokenizer.model, vocab.json + merges.txt, tiktoken rank files, tokenizer.json)
-> conversation templates -> label masking -> image preprocessing -> the LLaVA JSON dataset -> collate and
the modality-grouped length sampler -> a built-in synthetic multi-domain dataset.

It reproduces MoE-LLaVA's data pipeline (docs/moe_llava.md §3; bare § numbers below cite it): family special tokens (§3.2),
the plain / phi / qwen / stablelm / v1 templates (§3.3), "<image>" -> IMAGE_TOKEN_INDEX (§3.4), the
supervised spans of preprocess_plain / preprocess_phi / preprocess_v1 (§3.5), expand2square + the
CLIP / SigLIP processors (§3.6), the collator and LengthGroupedSampler (§3.7), the JSON format (§3.8).
Where we depart from the original, each departure is a knob or has a comment next to it:
  * a bad sample (missing/corrupt image, malformed turns, wrong "<image>" count, masking that does not
    line up, too long) is a counted skip with a report naming the record, or an error with
    strict=True. The original replaces it with a random other sample (§3.6) or zeroes its loss (§3.5, §8.6).
  * the sampler draws every random number from one generator seeded by (seed, epoch). The original
    shuffles each modality with the global RNG, so its order did not follow the seed.

Build the synthetic dataset:  python data.py --out out/synthetic [--seed 0 --n-train 4000 ...]
"""
import base64
import bisect
import json
import math
import os
import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import tokenizers
from PIL import Image, ImageDraw, ImageFont
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from moe import check_choice

IMAGE_PLACEHOLDER = "<image>"  # DEFAULT_IMAGE_TOKEN (§3.1)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class DataConfig:
    data_path: str = ""              # LLaVA JSON: a list of {id, image?, conversations} (§3.8)
    image_folder: str = ""           # the "image" paths in the JSON are relative to this folder
    tokenizer_path: str = ""         # a model dir or tokenizer file: what Tokenizer.load reads
    tokenizer_family: str = "phi"    # phi | qwen | stablelm | llama: special-token conventions (§3.2)
    template: str = "phi"            # a key of TEMPLATES (§3.3)
    image_processor: str = "clip"    # clip: shortest side + center crop | siglip: square resize (§3.6)
    image_size: int = 336            # clip: shortest edge = crop side; siglip: the square side
    image_aspect: str = "pad"        # pad: expand2square (stages II/III) | square: processor only (stage I)
    resize_backend: str = "pil"      # pil: PIL bicubic, as the original's HF slow processor does
                                     # tensor: torchvision on a uint8 tensor (transformers 5's default)
    image_mean: tuple | None = None  # None: the processor's own (CLIP or SigLIP) statistics
    image_std: tuple | None = None
    max_length: int = 2048           # model_max_length: input_ids (one id per image) are cut to this
    overlength: str = "truncate"     # truncate (the original's collator) | skip
    max_images: int = 16             # MAX_IMAGE_LENGTH (§3.1). More images is a skip; the original
                                     # subsamples them at random, which would break the "<image>" count
    check_images_exist: bool = True  # stat every image when the JSON is loaded, so missing files are
                                     # reported before training rather than discovered at step 50k
    strict: bool = False             # raise DataError on the first bad sample instead of skipping it
    max_skip_share: float = 0.05     # train.py stops (with the skip report, saved in the run dir) when more
                                     # than this share of the records is skipped: a wrong image folder or
                                     # template would otherwise train on what is left and exit 0

    def __post_init__(self):
        for name, allowed in (("image_processor", ("clip", "siglip")), ("image_aspect", ("pad", "square")),
                              ("resize_backend", ("pil", "tensor")), ("overlength", ("truncate", "skip")),
                              ("template", tuple(TEMPLATES)), ("tokenizer_family", tuple(FAMILIES))):
            check_choice(f"data.{name}", getattr(self, name), allowed)
        clip = self.image_processor == "clip"
        self.image_mean = tuple(self.image_mean or (CLIP_MEAN if clip else SIGLIP_MEAN))
        self.image_std = tuple(self.image_std or (CLIP_STD if clip else SIGLIP_STD))

    def to_checkpoint(self) -> dict:
        """What train.py saves as config.json["data"]: every field that changes how a sample is tokenized, cut
        or preprocessed, so that eval.py prepares its inputs as training did."""
        return {k: getattr(self, k) for k in CHECKPOINT_FIELDS}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> tuple["DataConfig", list[str]]:
        """The config a checkpoint's "data" dict describes, and the CHECKPOINT_FIELDS it lacks (checkpoints
        saved before a field was), which keep their defaults."""
        missing = [k for k in CHECKPOINT_FIELDS if k not in saved]
        return cls(**{k: saved[k] for k in CHECKPOINT_FIELDS if k in saved}), missing


# The preprocessing a checkpoint carries. The rest of DataConfig is where the training data lives
# (data_path, image_folder, tokenizer_path: the tokenizer itself is saved as tokenizer.json) and how bad
# samples are handled (check_images_exist, strict).
CHECKPOINT_FIELDS = ("template", "tokenizer_family", "image_processor", "image_size", "image_aspect", "resize_backend",
                     "image_mean", "image_std", "max_length", "overlength", "max_images")


class DataError(ValueError):
    """A sample that cannot be used. `reason` is a short key that the report counts by."""
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

# -----------------------------------------------------------------------------
# Tokenizers
#
# Tokenizer.load reads the files checkpoints ship and encodes as the tokenizer the original projects train
# with: LLaVA and MoE-LLaVA load theirs with use_fast=False (transformers 4.37 for MoE-LLaVA), so a Llama /
# Vicuna checkpoint holds a SentencePiece tokenizer.model, a Phi-2 one GPT-2-style vocab.json + merges.txt +
# added_tokens.json, Qwen-1 and StableLM-2 tiktoken rank files. Each becomes a tokenizers.Tokenizer: one
# engine encodes them all (with the character offsets the label masks need), and train.py saves whichever it
# was as tokenizer.json with every checkpoint.

# Pre-tokenization regex of Qwen-1's qwen.tiktoken; StableLM-2's Arcade100k uses the same one.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Special tokens after the ranks. Qwen-1: Tokenizer.from_tiktoken("qwen.tiktoken", "qwen", QWEN_SPECIALS)
# (ids from 151643 = len(ranks)). StableLM-2: from_tiktoken("arcade100k.tiktoken", "stablelm",
# ARCADE100K_SPECIALS, special_start=100257), which puts <|endoftext|> at 100257 and <|reg0|> at 100280.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
ARCADE100K_SPECIALS = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
                       + ["<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                          "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                          "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>"]
                       + ["<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"]
                       + [f"<|reg{i}|>" for i in range(8)] + ["<|extra0|>"])

# How MoE-LLaVA's train.py sets up each family's special tokens (§3.2). For all of them pad := unk.
FAMILIES = {
    # family:   eos,              unk,            unk may be added, bos
    "phi":      ("<|endoftext|>", "<|extra_0|>", True,  None),   # unk is a new token (id = vocab size)
    "qwen":     ("<|endoftext|>", "<|extra_0|>", True,  None),   # already a special of qwen.tiktoken
    "stablelm": ("<|endoftext|>", "<|reg0|>",    False, None),   # Arcade100k cannot grow: reuse <|reg0|>
    "llama":    ("</s>",          "<unk>",       False, "<s>"),  # v1 / vicuna / llava_v1 tokenizers
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken rank file: one "<base64 token> <rank>" per line (qwen.tiktoken, arcade100k.tiktoken)."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not '<base64 token> <rank>': {line[:60]!r}") from e
    return ranks


def tiktoken_to_tokenizers(ranks: dict[bytes, int], special_tokens: list[str], special_start: int | None = None,
                           pattern: str = QWEN_PATTERN) -> tokenizers.Tokenizer:
    """A byte-level BPE that encodes like tiktoken: the vocab is the ranks; merges are rebuilt from them.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so every split of a token
    into two tokens is a merge whose priority is the rank of the result (ties: the lower-ranked left
    piece first). ignore_merges=True copies tiktoken's shortcut of taking a pre-token that is itself a
    token whole. Special tokens get ids special_start, special_start+1, ... (default: after the ranks).
    """
    b2u = bytes_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(text(a), text(b)) for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
    start = len(ranks) if special_start is None else special_start
    used = set(ranks.values())
    for i, tok in enumerate(special_tokens):
        if tok in vocab or start + i in used:
            raise ValueError(f"special token {tok!r} (id {start + i}) collides with the ranks")
        vocab[tok] = start + i
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tk


def read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def gpt2_to_tokenizers(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
    """GPT-2-style slow tokenizer files (Phi-2's CodeGenTokenizer) as a tokenizers BPE with the same ids.

    The slow tokenizer ranks the merges by line of merges.txt, read as lines [1:-1] (the "#version" line and
    the empty string after the final newline are no merges); splits the text with GPT-2's regex, which is
    ByteLevel's with use_regex, and no prefix space; and merges, in each piece, the pair of the lowest rank
    until no pair has one (all its occurrences left to right, which ends where tokenizers' one-at-a-time,
    leftmost-first merging does). Added tokens come from read_added_tokens.
    """
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1:-1]
    merges = [tuple(line.split()) for line in lines if len(line.split()) == 2]
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n, i, shift = n | (b & 0x7F) << shift, i + 1, shift + 7
        if b < 0x80:
            return n, i


def protobuf_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one serialized protobuf message, in order: varints as ints, length-delimited
    and fixed-size (32-, 64-bit) fields as their bytes."""
    fields, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        else:
            if wire == 2:
                n, i = _varint(buf, i)
            elif wire in (1, 5):
                n = 8 if wire == 1 else 4
            else:
                raise ValueError(f"protobuf wire type {wire} (field {number}) is not one a SentencePiece model uses")
            value, i = buf[i:i + n], i + n
        fields.append((number, value))
    return fields


# The fields of SentencePiece's ModelProto (sentencepiece_model.proto) read here, with their proto2 defaults:
# 1 pieces {1 piece, 2 score (float), 3 type}, 2 trainer_spec, 3 normalizer_spec.
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6     # piece types
SP_TRAINER = {3: ("model_type", 1), 24: ("treat_whitespace_as_suffix", 0), 35: ("byte_fallback", 0)}
SP_NORMALIZER = {2: ("precompiled_charsmap", b""), 3: ("add_dummy_prefix", 1), 4: ("remove_extra_whitespaces", 1),
                 5: ("escape_whitespaces", 1)}
SP_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def read_sentencepiece(path: str) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """A SentencePiece .model file: its pieces [(piece, score, type)] in id order, trainer and normalizer specs."""
    with open(path, "rb") as f:
        model = protobuf_fields(f.read())
    pieces = []
    for number, value in model:
        if number == 1:
            p = dict(protobuf_fields(value))
            pieces.append((p.get(1, b"").decode("utf-8"), struct.unpack("<f", p[2])[0] if 2 in p else 0.0,
                           p.get(3, SP_NORMAL)))

    def spec(number, names):
        saved = dict(protobuf_fields(dict(model).get(number, b"")))
        return {name: saved.get(k, default) for k, (name, default) in names.items()}
    return pieces, spec(2, SP_TRAINER), spec(3, SP_NORMALIZER)


def sentencepiece_to_tokenizers(path: str) -> tokenizers.Tokenizer:
    """A SentencePiece BPE tokenizer.model (Llama, Vicuna, Mistral) as a tokenizers BPE that encodes as
    transformers' slow LlamaTokenizer with legacy=True, as LLaVA and MoE-LLaVA (transformers 4.37) run it:

      * the text is cut at the added tokens (<unk> <s> </s>, and those of read_added_tokens), the longest
        first, and the whitespace around them is left alone;
      * every other piece is encoded by SentencePiece on its own, whose normalizer writes " " as "▁" and puts a
        "▁" in front of the piece (add_dummy_prefix): "</s>USER" -> "</s>", "▁USER"; data.py's chunk "\nWhat"
        after an "<image>" -> "▁", "<0x0A>", "What"; the empty chunk after a trailing "<image>" -> nothing.
        Llama's normalizer is the identity and keeps every space, so " a" is "▁▁a" and runs stay runs;
      * BPE over the whole piece (no pre-tokenization): merge the adjacent pair whose concatenation is a piece
        of the highest score, the leftmost on a tie, until none is; a symbol that is no piece becomes the
        <0xXX> pieces of its UTF-8 bytes (byte_fallback).

    In tokenizers: a normalizer that prepends "▁" and replaces " " (run on each piece between added tokens,
    which are not normalized), no pre-tokenizer, and a merge list of every split of every piece into two
    pieces, ranked by that piece's score. Two splits of one piece rank apart where SentencePiece ties them
    and takes the leftmost; that could only matter for overlapping pairs ([ab][a][ba] -> "aba").
    tokenizer_config.json's "legacy" is not read. legacy=False (transformers' later default) puts no "▁" after
    an added token; transformers 5's conversion (a Metaspace pre-tokenizer) adds no "▁" to a piece that
    already starts with a space, so " a" loses one. Models set up otherwise than Llama's are refused.
    """
    pieces, trainer, normalizer = read_sentencepiece(path)
    if trainer["model_type"] != 2:
        raise ValueError(f"{path}: a SentencePiece {SP_MODEL_TYPES.get(trainer['model_type'], '?')} model; "
                         "only BPE models (Llama, Vicuna, Mistral) are read")
    unlike_llama = [what for what, is_set in (
        ("a normalization rule (precompiled_charsmap)", normalizer["precompiled_charsmap"]),
        ("remove_extra_whitespaces", normalizer["remove_extra_whitespaces"]),
        ("escape_whitespaces off", not normalizer["escape_whitespaces"]),
        ("treat_whitespace_as_suffix", trainer["treat_whitespace_as_suffix"]),
        ("user-defined or unused pieces", any(t in (SP_USER_DEFINED, SP_UNUSED) for _, _, t in pieces))) if is_set]
    if unlike_llama:
        raise ValueError(f"{path}: {', '.join(unlike_llama)}: not set up as Llama's SentencePiece model, the one read here")
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    score = {piece: s for piece, s, t in pieces if t == SP_NORMAL}
    merges = [(p[:k], p[k:]) for p in sorted(score, key=lambda p: -score[p])      # stable: equal scores by id
              for k in range(1, len(p)) if p[:k] in score and p[k:] in score]
    unk = next((piece for piece, _, t in pieces if t == SP_UNKNOWN), None)
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                         byte_fallback=bool(trainer["byte_fallback"])))
    prefix = bool(normalizer["add_dummy_prefix"])
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + [decoders.Strip(" ", 1, 0)] * prefix)
    tk.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                           for piece, _, t in pieces if t in (SP_UNKNOWN, SP_CONTROL)])
    return tk


def read_added_tokens(folder: str) -> list[tuple[int | None, AddedToken]]:
    """(id, token) of the tokens a slow tokenizer adds to its vocabulary file, as transformers reads a saved
    folder: tokenizer_config.json's "added_tokens_decoder" (saved since transformers 4.34, with each token's
    flags), else added_tokens.json ({content: id}), special if special_tokens_map.json names it; a special
    token named there but in neither file (Phi-2's <|endoftext|>, in vocab.json) comes with id None. The slow
    tokenizers cut the text at these before encoding it, as tokenizers does with non-normalized added tokens
    (normalized ones would be looked for after the "▁" prefix, in SentencePiece's case)."""
    config = read_json(folder, "tokenizer_config.json")
    if "added_tokens_decoder" in config:
        return [(int(i), AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                                    rstrip=t.get("rstrip", False), normalized=False, special=t.get("special", False)))
                for i, t in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))]
    named = list(read_json(folder, "special_tokens_map.json").values())
    named += [config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    specials = {t["content"] if isinstance(t, dict) else t for v in named for t in (v if isinstance(v, list) else [v]) if t}
    added = read_json(folder, "added_tokens.json")
    return ([(i, AddedToken(t, normalized=False, special=t in specials)) for t, i in sorted(added.items(), key=lambda kv: kv[1])]
            + [(None, AddedToken(t, normalized=False, special=True)) for t in sorted(specials - set(added))])


def add_tokens(tk: tokenizers.Tokenizer, tokens: list[tuple[int | None, AddedToken]], where: str):
    """Add read_added_tokens' tokens in id order: a token of the vocabulary file keeps its id, a new one takes
    the next, which must be the id the files give it."""
    for i, token in tokens:
        if i is None and tk.token_to_id(token.content) is None:
            continue              # named special, in no file: Tokenizer adds the family's unk itself (§3.2)
        (tk.add_special_tokens if token.special else tk.add_tokens)([token])
        if i is not None and tk.token_to_id(token.content) != i:
            raise ValueError(f"{where}: added token {token.content!r} has id {i} there but would get "
                             f"{tk.token_to_id(token.content)} (new ids follow the vocabulary's, in order)")


def train_bpe_tokenizer(texts, vocab_size: int, special_tokens: list[str]) -> tokenizers.Tokenizer:
    """A small byte-level BPE (GPT-2 pre-tokenizer: a space sticks to the word after it, as in phi/qwen)."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return tk


class Tokenizer:
    """A tokenizers.Tokenizer with the family's eos / pad / bos ids and the image-placeholder split."""

    def __init__(self, tk: tokenizers.Tokenizer, family: str):
        eos, unk, may_add_unk, bos = FAMILIES[family]
        if tk.token_to_id(unk) is None:
            if not may_add_unk:
                raise ValueError(f"{family} tokenizer has no {unk!r} token to use as unk/pad")
            tk.add_special_tokens([AddedToken(unk, special=True, normalized=False)])
        # We add BOS ourselves and need untrimmed character offsets for the label masks, so the
        # post-processor (BOS template or ByteLevel offset trimming) is dropped.
        tk.post_processor = None
        self.tk, self.family = tk, family
        self.eos_id, self.unk_id = self._id(eos), self._id(unk)
        self.pad_id = self.unk_id
        self.bos_id = self._id(bos) if bos else None

    def _id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.family} tokenizer has no {token!r} token")
        return i

    @classmethod
    def from_file(cls, path: str, family: str) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(path), family)

    @classmethod
    def load(cls, path: str, family: str) -> "Tokenizer":
        """A tokenizer file, or a model dir holding one; in a dir, the first found of
          tokenizer.model            SentencePiece BPE (Llama, Vicuna, Mistral): sentencepiece_to_tokenizers
          vocab.json + merges.txt    GPT-2-style byte-level BPE (Phi-2): gpt2_to_tokenizers
          *.tiktoken                 Qwen-1's qwen.tiktoken, StableLM-2's arcade100k.tiktoken (by family)
          tokenizer.json             a tokenizers file: HF fast tokenizers, and what train.py saves
        The slow files come first because they are what LLaVA and MoE-LLaVA load (use_fast=False); the added
        tokens of the first two come from the dir's json files (read_added_tokens). train.py and eval.py both
        load through here."""
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer {path!r} not found: give a tokenizer file or a model dir holding one "
                                    "(data.tokenizer_path in train.py, --tokenizer in eval.py)")
        folder, name = (path, None) if os.path.isdir(path) else os.path.split(path)
        if name is None:
            names = sorted(os.listdir(folder))
            name = next((n for n in ("tokenizer.model", "vocab.json") if n in names), None) or next(
                (n for n in names if n.endswith(".tiktoken")), "tokenizer.json" if "tokenizer.json" in names else None)
            if name is None:
                raise FileNotFoundError(f"{path}: no tokenizer.model, vocab.json + merges.txt, *.tiktoken or tokenizer.json")
        file = os.path.join(folder, name)
        if name.endswith(".tiktoken"):
            if family == "qwen":
                return cls.from_tiktoken(file, family, QWEN_SPECIALS)
            if family == "stablelm":
                return cls.from_tiktoken(file, family, ARCADE100K_SPECIALS, special_start=100257)
            raise ValueError(f"{file}: a tiktoken file needs tokenizer_family 'qwen' or 'stablelm', not {family!r}")
        if name.endswith(".model"):
            tk = sentencepiece_to_tokenizers(file)
        elif name in ("vocab.json", "merges.txt"):
            if not all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")):
                raise FileNotFoundError(f"{folder}: a GPT-2-style tokenizer needs both vocab.json and merges.txt")
            if read_json(folder, "tokenizer_config.json").get("add_prefix_space"):
                raise ValueError(f"{folder}/tokenizer_config.json: add_prefix_space=true is not supported (Phi-2's is false)")
            tk = gpt2_to_tokenizers(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
        else:
            return cls.from_file(file, family)
        add_tokens(tk, read_added_tokens(folder), folder)
        return cls(tk, family)

    @classmethod
    def from_tiktoken(cls, path: str, family: str, special_tokens: list[str], special_start: int | None = None,
                      pattern: str = QWEN_PATTERN) -> "Tokenizer":
        return cls(tiktoken_to_tokenizers(load_tiktoken_ranks(path), special_tokens, special_start, pattern), family)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and their [start, end) character spans in text; no BOS. Each "<image>" becomes one
        IMAGE_TOKEN_INDEX and the text between them is encoded chunk by chunk, as §3.4 does."""
        ids, spans, pos = [], [], 0
        for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
                spans.append((pos, pos + len(IMAGE_PLACEHOLDER)))
                pos += len(IMAGE_PLACEHOLDER)
            enc = self.tk.encode(chunk, add_special_tokens=False)
            ids += enc.ids
            spans += [(pos + s, pos + e) for s, e in enc.offsets]
            pos += len(chunk)
        return ids, spans

    def tokenize_with_images(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self.encode_spans(text)[0]

# -----------------------------------------------------------------------------
# Conversation templates (§3.3)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Template:
    name: str
    system: str = SYSTEM
    style: str = "two"                   # "two": system, USER/ASSISTANT turns | "plain": stage-I captions
    roles: tuple = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "<|endoftext|>"          # closes every assistant turn; supervised
    bos: bool = True                     # False: no BOS even where the tokenizer has one (LLaVA-MoLE's inference)
    image_newline: bool = True           # False: a "\n" right after "<image>" goes with the marker (LLaVA-MoLE
                                         # splits its prompt at "<image>\n", docs/llava_mole.md §2)

    def segments(self, turns: list[str]) -> list[tuple[str, bool]]:
        """(text, supervised) pieces whose concatenation is the rendered conversation.

        turns alternate user, assistant, user, ...; an odd count ends in a generation prompt
        "... ASSISTANT:" (no trailing space). The space after "ASSISTANT:" starts the answer segment:
        byte-level BPE glues it to the first answer token, which is what the original's "-1" on the
        instruction length accounts for (§3.5), so answers are supervised from that token on.
        """
        if self.style == "plain":
            # preprocess_plain: the user turn is replaced by the bare placeholder; caption + sep supervised
            return [(IMAGE_PLACEHOLDER, False)] + ([(turns[1] + self.sep, True)] if len(turns) > 1 else [])
        user, assistant = self.roles
        segs, head = [], self.system + self.sep
        for i in range(0, len(turns), 2):
            turn = turns[i] if self.image_newline else turns[i].replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER)
            segs.append((f"{head}{user}: {turn}{self.sep}{assistant}:", False))
            if i + 1 < len(turns):
                segs.append((" " + turns[i + 1] + self.sep2, True))
            head = ""
        return segs

    def render(self, turns: list[str]) -> str:
        return "".join(text for text, _ in self.segments(turns))


TEMPLATES = {
    "plain": Template("plain", system="", style="plain", sep="\n", sep2=""),
    "phi": Template("phi"),
    "qwen": Template("qwen"),            # an alias of phi in the original (its version stays "phi")
    "stablelm": Template("stablelm"),
    "v1": Template("v1", sep2="</s>"),
    "vicuna_v1": Template("vicuna_v1", sep2="</s>"),
    "llava_v1": Template("llava_v1", system=SYSTEM_LLAVA, sep2="</s>"),
    # LLaVA-MoLE's released inference prompt: Vicuna v1, each piece tokenized without special tokens (no BOS), the
    # prompt split at "<image>\n" (docs/llava_mole.md §2). Its training prompt is not released: the same, inferred.
    "mole_v1": Template("mole_v1", sep2="</s>", bos=False, image_newline=False),
}

# -----------------------------------------------------------------------------
# Label masking (§3.5)

def check_template(tok: Tokenizer, template: Template):
    """The template's end-of-turn must be the tokenizer's eos: a phi template on a llama tokenizer
    (or the reverse) is the usual cause of MoE-LLaVA's "tokenization mismatch" / loss 0 (§8.6)."""
    if template.style == "two" and tok.encode(template.sep2) != [tok.eos_id]:
        raise ValueError(f"template {template.name!r} closes turns with {template.sep2!r}, which this "
                         f"{tok.family} tokenizer encodes as {tok.encode(template.sep2)}, not its eos id {tok.eos_id}")


def tokenize_conversation(tok: Tokenizer, template: Template, turns: list[str]) -> tuple[list[int], list[int]]:
    """input_ids and labels of one conversation; labels are IGNORE_INDEX outside supervised segments.

    The full string is encoded once (chunked at "<image>" as §3.4) and every token takes the role of
    the segment its characters start in. This equals concatenating per-segment tokenizations whenever
    no token straddles a segment boundary, and we check exactly that. (Encoding each segment on its
    own would break on SentencePiece tokenizers, which add a "▁" at the start of every call; that is
    what LLaVA's v1 "-2" arithmetic patches around.) A straddling token means the answer boundary
    is ambiguous -> DataError("token_mismatch"), never a silently all-masked sample.
    """
    segs = template.segments(turns)
    ids, spans = tok.encode_spans("".join(text for text, _ in segs))
    ends = [0]
    for text, _ in segs:
        ends.append(ends[-1] + len(text))
    labels = []
    for i, (s, e) in zip(ids, spans):
        k = min(bisect.bisect_right(ends, s), len(segs)) - 1    # the segment that holds character s
        if e > ends[k + 1]:
            raise DataError("token_mismatch", f"token {tok.tk.id_to_token(i)!r} crosses the segment boundary "
                                              f"after {segs[k][0][-30:]!r}")
        labels.append(i if segs[k][1] and i != IMAGE_TOKEN_INDEX else IGNORE_INDEX)
    if tok.bos_id is not None and template.bos:       # BOS is never supervised (preprocess_v1 starts at 1)
        ids, labels = [tok.bos_id] + ids, [IGNORE_INDEX] + labels
    return ids, labels

# -----------------------------------------------------------------------------
# Images (§3.6)

def expand_to_square(img: Image.Image, fill: tuple) -> Image.Image:
    """expand2square: centre the image on a max(W, H) square filled with the processor's mean colour."""
    w, h = img.size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    return F.pad(img, [left, top, side - w - left, side - h - top], fill=fill)


def process_image(img: Image.Image, cfg: DataConfig) -> torch.Tensor:
    """PIL image -> normalised [3, S, S], matching transformers' CLIP / SigLIP image processors."""
    img = img.convert("RGB")
    if cfg.image_aspect == "pad":
        img = expand_to_square(img, tuple(int(m * 255) for m in cfg.image_mean))
    x = img if cfg.resize_backend == "pil" else F.pil_to_tensor(img)   # PIL, or uint8 [3, H, W]
    bicubic, S = v2.InterpolationMode.BICUBIC, cfg.image_size
    if cfg.image_processor == "clip":
        x = F.resize(x, S, interpolation=bicubic, antialias=True)         # shortest side -> S
        h, w = F.get_size(x)
        # floor offsets as transformers' center_crop; torchvision's center_crop rounds instead
        x = F.crop(x, (h - S) // 2, (w - S) // 2, S, S)
    else:
        x = F.resize(x, [S, S], interpolation=bicubic, antialias=True)
    x = F.to_dtype(F.to_image(x), torch.float32, scale=True)            # [3, S, S] in [0, 1]
    return F.normalize(x, cfg.image_mean, cfg.image_std).as_subclass(torch.Tensor)


def load_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise DataError("missing_image", f"{path} not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError("bad_image", f"{path}: {type(e).__name__}: {e}") from None

# -----------------------------------------------------------------------------
# LLaVA JSON dataset (§3.8)

@dataclass
class Skip:
    """A record that was not used, and why. Returned by the dataset in place of a sample."""
    index: int       # position in the JSON list
    id: str          # the record's own "id"
    reason: str
    detail: str = ""


@dataclass
class DataStats:
    """Skips and truncations per record index, so reporting the same record twice (again next epoch,
    or once from a worker's batch and once in-process) counts it once."""
    n_records: int = 0
    skipped: dict = field(default_factory=dict)    # record index -> Skip
    truncated: set = field(default_factory=set)    # record indices cut to max_length

    def update(self, batch: dict):
        """Merge what a collated batch carries (DataLoader workers keep their own copy of the dataset)."""
        for s in batch.get("skipped", []):
            self.skipped.setdefault(s.index, s)
        self.truncated.update(batch.get("truncated", []))

    def counts(self) -> Counter:
        return Counter(s.reason for s in self.skipped.values())

    def report(self, max_examples: int = 3) -> str:
        lines = [f"data: {self.n_records} records, {len(self.skipped)} skipped, {len(self.truncated)} truncated"]
        for reason, n in sorted(self.counts().items()):
            ex = sorted((s for s in self.skipped.values() if s.reason == reason), key=lambda s: s.index)[:max_examples]
            lines.append(f"  skipped {reason}: {n}, e.g. " + "; ".join(f"#{s.index} id={s.id}: {s.detail}" for s in ex))
        if self.truncated:
            lines.append(f"  truncated records (first {max_examples}): {sorted(self.truncated)[:max_examples]}")
        return "\n".join(lines)


def parse_record(rec, template: Template, cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(turn texts, image paths) of one JSON record, or DataError saying what is wrong with it."""
    if not isinstance(rec, dict):
        raise DataError("bad_record", f"a {type(rec).__name__}, not an object")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError("malformed_conversation", "'conversations' is missing, empty or not a list")
    turns = []
    for n, t in enumerate(conv):
        want = ("human", "gpt")[n % 2]
        if not isinstance(t, dict) or t.get("from") != want:
            got = t.get("from") if isinstance(t, dict) else type(t).__name__
            # the original drops a leading non-human turn; we report it like any other ordering problem
            raise DataError("malformed_conversation", f"turn {n} is {got!r}, expected {want!r} (human/gpt alternate)")
        if not isinstance(t.get("value"), str) or not t["value"].strip():
            raise DataError("malformed_conversation", f"turn {n} has no text")
        if want == "gpt" and IMAGE_PLACEHOLDER in t["value"]:
            raise DataError("malformed_conversation", f"turn {n}: '<image>' in an answer")
        turns.append(t["value"])
    if len(turns) % 2:
        raise DataError("malformed_conversation", "ends with a human turn (nothing to learn)")
    images = rec.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError("bad_record", f"'image' must be a path or a list of paths, got {rec.get('image')!r}")
    n_tokens = sum(t.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_tokens != len(images):
        raise DataError("image_count_mismatch", f"{n_tokens} '<image>' in the text, {len(images)} images")
    if len(images) > cfg.max_images:
        raise DataError("too_many_images", f"{len(images)} > max_images={cfg.max_images}")
    if template.style == "plain" and (len(turns) != 2 or len(images) != 1):
        raise DataError("malformed_conversation", "the plain template takes one image and one caption")
    return turns, [os.path.join(cfg.image_folder, p) for p in images]


def file_sha256(path: str) -> str:
    """The file's sha256, streamed: what train.py's run identity and eval.py's answer fingerprint compare."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_records(path: str) -> list:
    """The records of a LLaVA JSON file (a list of objects) or of a .jsonl file (one object per line). A syntax
    error is a DataError naming the file, line and column: a 1 GB instruction mix is not searched by hand."""
    if not os.path.isfile(path):
        raise DataError("missing_file", f"{path!r} not found (data.data_path: a LLaVA .json list or a .jsonl file)")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError("bad_json", f"{path}:{n}:{e.colno}: {e.msg} (a .jsonl file holds one JSON "
                                                    "object per line)") from None
            return records
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError("bad_json", f"{path}:{e.lineno}:{e.colno}: {e.msg}"
                                        + (" (one record per line? name the file .jsonl)" if e.msg == "Extra data" else "")) from None
    if not isinstance(records, list):
        raise DataError("bad_json", f"{path} holds a JSON {type(records).__name__}, not a list of records")
    return records


class LlavaJsonDataset(torch.utils.data.Dataset):
    """MoE-LLaVA's LazySupervisedDataset: records are checked when loaded (structure, "<image>" count,
    image files exist) and tokenized / decoded lazily. A bad record is a counted Skip (returned in place
    of the sample and dropped by collate) or, with cfg.strict, a DataError naming it."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, records: list | None = None):
        self.cfg, self.tok, self.template = cfg, tokenizer, TEMPLATES[cfg.template]
        check_template(tokenizer, self.template)
        records = read_records(cfg.data_path) if records is None else records
        self.records, self.stats = records, DataStats(n_records=len(records))
        self.keep, self.modality_lengths = [], []   # usable record indices; signed lengths for the sampler
        for i, rec in enumerate(records):
            try:
                turns, paths = parse_record(rec, self.template, cfg)
                for p in paths if cfg.check_images_exist else []:
                    if not os.path.isfile(p):
                        raise DataError("missing_image", f"{p} not found")
            except DataError as e:
                self._skip(i, e)
                continue
            self.keep.append(i)
            # LLaVA's modality_lengths: whitespace words, + with image(s), - text-only. At least 1: the
            # original drops zero-length samples from the epoch.
            words = max(1, sum(len(t.split()) for t in turns))
            self.modality_lengths.append(words if paths else -words)

    def _skip(self, index: int, e: DataError) -> Skip:
        rec = self.records[index]
        rid = str(rec.get("id", index)) if isinstance(rec, dict) else str(index)
        if self.cfg.strict:
            raise DataError(e.reason, f"record #{index} (id={rid}): {e.detail}")
        skip = Skip(index, rid, e.reason, e.detail)
        self.stats.skipped.setdefault(index, skip)
        return skip

    def __len__(self):
        return len(self.keep)

    def report(self) -> str:
        return self.stats.report()

    def __getitem__(self, k: int) -> dict | Skip:
        i, cfg = self.keep[k], self.cfg
        try:
            turns, paths = parse_record(self.records[i], self.template, cfg)
            ids, labels = tokenize_conversation(self.tok, self.template, turns)
            truncated = len(ids) > cfg.max_length
            if truncated:
                if cfg.overlength == "skip":
                    raise DataError("too_long", f"{len(ids)} tokens > max_length={cfg.max_length}")
                if IMAGE_TOKEN_INDEX in ids[cfg.max_length:]:
                    raise DataError("truncation_cuts_image", f"an image lies beyond max_length={cfg.max_length}")
                ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                raise DataError("no_supervised_tokens", f"nothing left to learn in {len(ids)} tokens")
            images = torch.zeros(0, 3, cfg.image_size, cfg.image_size)           # text-only: no image
            if paths:
                images = torch.stack([process_image(load_image(p), cfg) for p in paths])
        except DataError as e:
            return self._skip(i, e)
        if truncated:
            self.stats.truncated.add(i)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),   # [T], [T]
                "images": images, "index": i, "truncated": truncated}             # [n_img, 3, S, S]

# -----------------------------------------------------------------------------
# Batching (§3.7)

def collate(samples: list, pad_id: int, padding_side: str = "right", image_size: int | None = None) -> dict:
    """Pad a list of samples (from the dataset, or {"input_ids", "images"} prompts) into a batch.

    right: training (labels padded with IGNORE_INDEX); left: generation prompts, so every prompt ends
    at the last column. attention_mask comes from the lengths, not from ids != pad_id as in the
    original: pad := unk, and an unk inside the text must not be masked out. Images are stacked
    flat in sample order, with image_counts[b] images for sample b. Skips are dropped and carried in
    "skipped", so the training loop can merge them into the report (DataStats.update); if every sample
    was skipped the batch is empty (B = 0), and image_size then gives the empty images tensor its shape.
    """
    skipped = [s for s in samples if isinstance(s, Skip)]
    samples = [s for s in samples if not isinstance(s, Skip)]
    B, T = len(samples), max((len(s["input_ids"]) for s in samples), default=0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)                   # [B, T]
    attention_mask = torch.zeros(B, T, dtype=torch.long)                       # [B, T]
    with_labels = bool(samples) and "labels" in samples[0]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)                # [B, T]
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, cols] = torch.as_tensor(s["input_ids"])
        attention_mask[b, cols] = 1
        if with_labels:
            labels[b, cols] = torch.as_tensor(s["labels"])
    if samples:
        images = torch.cat([s["images"] for s in samples])                    # [N_img, 3, S, S]
    else:
        images = torch.zeros(0, 3, image_size or 0, image_size or 0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "images": images,
             "image_counts": torch.tensor([len(s["images"]) for s in samples], dtype=torch.long),  # [B]
             "index": [s.get("index") for s in samples],
             "skipped": skipped, "truncated": [s["index"] for s in samples if s.get("truncated")]}
    if with_labels:
        batch["labels"] = labels
    return batch


def split_to_even_chunks(indices: list[int], lengths: list[int], n: int) -> list[list[int]]:
    """LLaVA's split: n chunks of equal count, each index to the chunk with the least total length so far."""
    if len(indices) % n:
        return [indices[i::n] for i in range(n)]
    per_chunk = len(indices) // n
    chunks, totals = [[] for _ in range(n)], [0] * n
    for i in indices:
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] = totals[c] + lengths[i] if len(chunks[c]) < per_chunk else math.inf
    return chunks


class ModalityLengthGroupedSampler(torch.utils.data.Sampler):
    """MoE-LLaVA's --group_by_modality_length sampler (LLaVA's LengthGroupedSampler), sharded by rank.

    lengths: signed (+ multimodal, - text-only; dataset.modality_lengths). batch_size: samples per rank
    per optimizer step (per-device batch x grad accumulation, as LLaVA passes it). Megabatches of
    world_size x batch_size are drawn per modality, sorted by length and split into world_size chunks
    of similar total length; rank r takes chunk r of each. Megabatch order is shuffled; the leftover
    mixed megabatch goes last, padded by wrapping round so that every rank gets ceil(N / world_size)
    samples (ranks must take the same number of steps). Every draw uses one generator seeded by
    seed + epoch, so the order is a function of (seed, epoch) alone.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, group_by_modality_length: bool = True):
        assert all(lengths), "lengths must be non-zero (the sign is the modality)"
        self.lengths, self.batch_size, self.world_size, self.rank = list(lengths), batch_size, world_size, rank
        self.seed, self.group = seed, group_by_modality_length
        self.epoch, self.start, self._yielded = 0, 0, 0

    def _length_grouped(self, idx: list[int], g: torch.Generator) -> list[list[int]]:
        mega = self.world_size * self.batch_size
        absl = {i: abs(self.lengths[i]) for i in idx}
        perm = [idx[p] for p in torch.randperm(len(idx), generator=g).tolist()]
        out = []
        for s in range(0, len(perm), mega):
            mb = sorted(perm[s:s + mega], key=lambda i: absl[i], reverse=True)
            out.append([i for chunk in split_to_even_chunks(mb, absl, self.world_size) for i in chunk])
        return out

    def megabatches(self) -> list[list[int]]:
        """The global order for this epoch, as megabatches; identical on every rank."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, mega = len(self.lengths), self.world_size * self.batch_size
        if not self.group:   # plain shuffle (stage I)
            perm = torch.randperm(n, generator=g).tolist()
            return [perm[s:s + mega] for s in range(0, n, mega)]
        mm = [i for i in range(n) if self.lengths[i] > 0]
        lang = [i for i in range(n) if self.lengths[i] < 0]
        if not mm or not lang:
            return self._length_grouped(mm or lang, g)
        mm_mb, lang_mb = self._length_grouped(mm, g), self._length_grouped(lang, g)
        tail = mm_mb[-1] + lang_mb[-1]               # the two last (possibly partial) megabatches, mixed
        body = mm_mb[:-1] + lang_mb[:-1]
        order = torch.randperm(len(body), generator=g).tolist()
        return [body[i] for i in order] + [sorted(tail)]

    def rank_indices(self) -> list[int]:
        mbs = self.megabatches()
        flat = [i for mb in mbs for i in mb]
        out = []
        for mb in mbs:
            if len(mb) % self.world_size:            # only a partial megabatch: wrap round to fill it
                need = -len(mb) % self.world_size
                mb = mb + (flat * (need // len(flat) + 1))[:need]
            per = len(mb) // self.world_size
            out += mb[self.rank * per:(self.rank + 1) * per]
        return out

    def set_epoch(self, epoch: int):
        self.epoch, self.start, self._yielded = epoch, 0, 0

    def __iter__(self):
        self._yielded = 0
        for i in self.rank_indices()[self.start:]:
            self._yielded += 1
            yield i

    def __len__(self):
        return math.ceil(len(self.lengths) / self.world_size) - self.start

    def _setup(self) -> dict:   # what fixes the order: resuming needs all of it unchanged
        return {"seed": self.seed, "n": len(self.lengths), "world_size": self.world_size,
                "batch_size": self.batch_size, "group": self.group}

    def state_dict(self, samples_consumed: int | None = None) -> dict:
        """samples_consumed: samples this rank's training loop has taken since iteration (re)started.
        Default: what this sampler has handed out, which is exact with num_workers=0. DataLoader
        workers prefetch, so with workers pass the training loop's own count."""
        consumed = self._yielded if samples_consumed is None else samples_consumed
        return {**self._setup(), "epoch": self.epoch, "start": self.start + consumed}

    def load_state_dict(self, state: dict):
        for key, now in self._setup().items():
            if state[key] != now:
                raise ValueError(f"cannot resume the sample order exactly: {key} was {state[key]}, now {now}")
        self.epoch, self.start, self._yielded = state["epoch"], state["start"], 0

# -----------------------------------------------------------------------------
# Synthetic multi-domain dataset: the demo's data, and something real for routing and STGC to act on.
# Domains share answer tokens but pull them in different directions: "3" is a count, a rendered digit
# and a sum; "red" is an object colour and a rendered word (drawn in another colour); "yes"/"no" answer
# existence (POPE) and spatial questions and can also be the rendered word; "A"/"B"/"C" are choices.

COLOURS = {"red": (220, 50, 47), "green": (50, 160, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30),
           "purple": (150, 70, 190), "orange": (245, 135, 30)}
COLOUR_WEIGHTS = (3, 1, 3, 1, 1, 1)  # red and blue are common, so POPE's "popular" negatives ask about them
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
WORDS = ("red", "blue", "yes", "no", "cat", "sun", "1", "2", "3", "4")
DOMAINS = {"color": 0.16, "count": 0.16, "spatial": 0.16, "ocr": 0.14, "pope": 0.16, "mc": 0.12, "text": 0.10}
POPE_CATEGORIES = ("adversarial", "popular", "random")
SHORT = "\nAnswer the question using a single word or phrase."          # the eval files' suffixes (§5.2)
LETTER = "\nAnswer with the option's letter from the given choices directly."


def synthetic_scene(rng: random.Random, with_text: bool) -> dict:
    """1-4 shapes in the cells of a 2x2 grid; or a word in the top half and 0-2 shapes below it."""
    cells = [2, 3] if with_text else [0, 1, 2, 3]
    objects = [{"colour": rng.choices(list(COLOURS), COLOUR_WEIGHTS)[0], "shape": rng.choice(SHAPES), "cell": c}
               for c in sorted(rng.sample(cells, rng.randint(0 if with_text else 1, len(cells))))]
    scene = {"objects": objects}
    if with_text:
        scene.update(text=rng.choice(WORDS), text_colour=rng.choice(list(COLOURS)))
    return scene


@lru_cache(maxsize=8)
def _font(px: int):
    return ImageFont.load_default(size=px)   # Pillow's built-in font: no font file, same glyphs everywhere


def synthetic_image(scene: dict, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw, half, m = ImageDraw.Draw(img), size / 2, size / 10
    for o in scene["objects"]:
        x0, y0 = (o["cell"] % 2) * half + m, (o["cell"] // 2) * half + m
        x1, y1, fill = x0 + half - 2 * m, y0 + half - 2 * m, COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    if "text" in scene:
        draw.text((half, half / 2), scene["text"], fill=COLOURS[scene["text_colour"]], font=_font(max(8, size // 3)),
                  anchor="mm")
    return img


def synthetic_caption(scene: dict) -> str:
    parts = [f"a {o['colour']} {o['shape']} in the {CELLS[o['cell']]}" for o in scene["objects"]]
    if "text" in scene:
        parts.insert(0, f"the word {scene['text']} written in {scene['text_colour']}")
    return " and ".join(parts).capitalize() + "."


def pope_question(scene: dict, rng: random.Random, category: str, positive: bool) -> tuple[str, str]:
    """POPE's object-existence probe. Negatives: random (any absent object), popular (absent objects in
    the most frequent colours), adversarial (absent objects sharing a colour or shape with a present one)."""
    present = sorted({(o["colour"], o["shape"]) for o in scene["objects"]})
    if positive:
        c, s = rng.choice(present)
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        if category == "popular":
            top = max(COLOUR_WEIGHTS[list(COLOURS).index(c)] for c, _ in absent)
            absent = [(c, s) for c, s in absent if COLOUR_WEIGHTS[list(COLOURS).index(c)] == top]
        elif category == "adversarial":
            absent = [(c, s) for c, s in absent if any(c == p or s == q for p, q in present)] or absent
        c, s = rng.choice(absent)
    return f"Is there a {c} {s} in the image?", "yes" if positive else "no"


def multiple_choice(question: str, options: list[str], hint: str = "N/A") -> str:
    """ScienceQA as LLaVA stores it: "Context: ...\\n<question>\\nA. ...\\nB. ..." (§5.2)."""
    return f"Context: {hint}\n{question}\n" + "\n".join(f"{'ABCDE'[k]}. {o}" for k, o in enumerate(options))


def synthetic_qa(domain: str, scene: dict | None, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of a domain about a scene (None for the text-only domain)."""
    if domain == "text":
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", str(a + b)
        return f"What number comes after {a + b}?", str(a + b + 1)
    objs = scene["objects"]
    unique = [o for o in objs if sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objs) == 1]
    name = lambda o: f"{o['colour']} {o['shape']}"  # noqa: E731
    if domain == "ocr":
        return rng.choice(("What is written in the image?", "What word is shown?")) + SHORT, scene["text"]
    if domain == "color" and "text" in scene and (not objs or rng.random() < 0.5):
        return "What color is the text?" + SHORT, scene["text_colour"]
    if domain == "color":
        o = rng.choice(objs)
        return f"What color is the {o['shape']} in the {CELLS[o['cell']]}?" + SHORT, o["colour"]
    if domain == "spatial" and unique:
        if len(unique) >= 2 and rng.random() < 0.5:
            a, b = rng.sample(unique, 2)
            left = a["cell"] % 2 < b["cell"] % 2
            return f"Is the {name(a)} to the left of the {name(b)}?" + SHORT, "yes" if left else "no"
        o = rng.choice(unique)
        return f"Where is the {name(o)}?" + SHORT, CELLS[o["cell"]]
    if domain == "pope":
        q, a = pope_question(scene, rng, rng.choice(POPE_CATEGORIES), rng.random() < 0.5)
        return q + SHORT, a
    if domain == "mc":
        o = rng.choice(objs)
        options = [o["colour"]] + rng.sample([c for c in COLOURS if c != o["colour"]], 2)
        rng.shuffle(options)
        q = multiple_choice(f"What color is the {o['shape']} in the {CELLS[o['cell']]}?", options)
        return q + LETTER, "ABC"[options.index(o["colour"])]
    what = rng.choice(SHAPES + ("shape",))             # count (and spatial without a unique object)
    return f"How many {what}s are there?" + SHORT, str(sum(what in ("shape", o["shape"]) for o in objs))


def _synthetic_record(split: str, i: int, rng: random.Random, image_size: int, image_dir: str) -> dict:
    domain = rng.choices(list(DOMAINS), list(DOMAINS.values()))[0]
    rec = {"id": f"{split}-{i:06d}", "domain": domain}
    scene = None
    if domain != "text":
        scene = synthetic_scene(rng, with_text=domain == "ocr" or (domain == "color" and rng.random() < 0.3))
        rec.update(image=f"{split}/{i:06d}.png", scene=scene)
        synthetic_image(scene, image_size).save(os.path.join(image_dir, rec["image"]), compress_level=1)
    qa = []
    for _ in range(rng.randint(1, 2)):
        q, a = synthetic_qa(domain, scene, rng)
        if all(q != q0 for q0, _ in qa):                 # a second turn asks something new
            qa.append((q, a))
    if scene is not None:   # MoE-LLaVA leaves "<image>" where the data puts it: first human turn, first line
        qa[0] = (IMAGE_PLACEHOLDER + "\n" + qa[0][0], qa[0][1])
    rec["conversations"] = [{"from": f, "value": v} for q, a in qa for f, v in (("human", q), ("gpt", a))]
    return rec


def _synthetic_eval_files(test: list[dict], seed: int) -> dict[str, object]:
    """Benchmark-format question files built from the test split's images (see build_synthetic_dataset)."""
    pope_q, pope_labels = [], {c: [] for c in POPE_CATEGORIES}
    problems, sqa_llava, gqa_q, gqa_gold, tv_q, tv_gold = {}, [], [], {}, [], []
    for n, rec in enumerate(test):
        rng, scene, image = random.Random(f"{seed}/eval/{n}"), rec.get("scene"), rec.get("image")
        pid, image_id = str(n), os.path.splitext(os.path.basename(image or ""))[0]
        if scene is None or scene["objects"]:           # ScienceQA: an image problem, or a text-only one
            if scene is None:
                colour, shape, digit = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(WORDS[6:])
                kind = rng.choice(("color", "shape"))
                question, options = f"Which of these is a {kind}?", [colour, shape, digit]
                answer = colour if kind == "color" else shape
            else:
                o = rng.choice(scene["objects"])
                question, answer = f"What color is the {o['shape']} in the {CELLS[o['cell']]}?", o["colour"]
                options = [answer] + rng.sample([c for c in COLOURS if c != answer], 2)
            rng.shuffle(options)
            problems[pid] = {"question": question, "choices": options, "answer": options.index(answer), "hint": "",
                             "image": image, "split": "test", "subject": "synthetic", "task": "closed choice"}
            prefix = IMAGE_PLACEHOLDER + "\n" if image else ""
            sqa_llava.append({"id": pid, **({"image": image} if image else {}), "conversations": [
                {"from": "human", "value": prefix + multiple_choice(question, options)},
                {"from": "gpt", "value": "ABC"[options.index(answer)]}]})
        if scene is None:
            continue
        if "text" in scene:                              # TextVQA: read the word; 10 identical answers
            q = rng.choice(("What is written in the image?", "What word is shown?"))
            tv_q.append({"question_id": n, "image": image, "text": q + SHORT})
            tv_gold.append({"question_id": n, "image_id": image_id, "question": q, "answers": [scene["text"]] * 10})
        if scene["objects"]:
            for cat in POPE_CATEGORIES:                  # as POPE: each image gets a yes and a no per category
                for positive in (True, False):
                    q, a = pope_question(scene, rng, cat, positive)
                    qid = len(pope_q)
                    pope_q.append({"question_id": qid, "image": image, "text": q + SHORT, "category": cat})
                    pope_labels[cat].append({"question_id": qid, "image": image, "text": q, "label": a})
            domain = ("color", "count", "spatial")[n % 3]
            q, a = synthetic_qa(domain, scene, rng)
            qid = f"{n:06d}"
            gqa_q.append({"question_id": qid, "image": image, "text": q})
            gqa_gold[qid] = {"question": q[:-len(SHORT)], "answer": a, "imageId": image_id, "isBalanced": True,
                             "types": {"detailed": domain}}
    pid_splits = {"train": [], "val": [], "test": list(problems)}
    return {"pope/llava_pope_test.jsonl": pope_q,
            **{f"pope/coco_pope_{c}.json": pope_labels[c] for c in POPE_CATEGORIES},
            "scienceqa/llava_test_CQM-A.json": sqa_llava, "scienceqa/problems.json": problems,
            "scienceqa/pid_splits.json": pid_splits,
            "gqa/llava_gqa_testdev_balanced.jsonl": gqa_q, "gqa/testdev_balanced_questions.json": gqa_gold,
            "textvqa/llava_textvqa_val_v051_ocr.jsonl": tv_q, "textvqa/TextVQA_0.5.1_val.json": {"data": tv_gold}}

# -----------------------------------------------------------------------------
# The conflict variant (variant="conflict"): token gradient conflict by construction, for bench/testbed.py.
# Four domains ask the same questions ("What color is the circle in the top left?") about the same kind of
# scene and answer from the same six colour words, but each names a colour by its own rule: domain k names
# the colour k steps round the colour wheel. The dial `conflict_strength` s in [0, 1] says on how many of the
# six colours the rules act (the first round(6 s) of WHEEL; the others every domain names as they are), so at
# s = 0 the four domains are one task under four names and at s = 1 every answer depends on the domain. The
# domain is visible only through its cue: a marker word at the start of the question ("[beta] What color
# ..."), or a grey frame round the image (cue="image"), or both. For the same seed, every strength has the
# same scenes, images, questions and tokenizer: only the answers of the conflicted colours change.
# Ideal routing (meta.json "conflict"): domain k's tokens belong to expert k (up to naming the experts),
# at the positions where the rule is applied, the positions that predict an answer token. A model that
# ignores the domain can at best answer a conflicted colour as one domain does: its ceiling is
# 1 - m/6 + (m/6)/4 with m conflicted colours (25% at s = 1). docs/testbed.md has the whole design.

CONFLICT_DOMAINS = ("alpha", "beta", "gamma", "delta")
WHEEL = ("red", "orange", "yellow", "green", "blue", "purple")      # the wheel the rules turn (all of COLOURS)
FRAMES = {"alpha": (20, 20, 20), "beta": (90, 90, 90), "gamma": (150, 150, 150), "delta": (205, 205, 205)}
CONFLICT_CUES = ("marker", "image", "both")


def conflicted_colours(strength: float) -> tuple:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"conflict_strength={strength} must be in [0, 1]")
    return WHEEL[:round(strength * len(WHEEL))]


def conflict_answer(domain: str, colour: str, strength: float) -> str:
    """Domain k names a conflicted colour by the one k steps round the wheel; any other colour as it is."""
    if colour not in conflicted_colours(strength):
        return colour
    return WHEEL[(WHEEL.index(colour) + CONFLICT_DOMAINS.index(domain)) % len(WHEEL)]


def domain_blind_ceiling(strength: float) -> float:
    """The best accuracy of a model that cannot tell the domains apart (uniform colours and domains)."""
    m = len(conflicted_colours(strength)) / len(WHEEL)
    return 1 - m + m / len(CONFLICT_DOMAINS)


def conflict_image(scene: dict, size: int) -> Image.Image:
    img = synthetic_image(scene, size)
    if "frame" in scene:                     # 2 pixels wide: every patch of a 2x2 grid touches it
        ImageDraw.Draw(img).rectangle((0, 0, size - 1, size - 1), outline=FRAMES[scene["frame"]], width=2)
    return img


def conflict_record(split: str, i: int, rng: random.Random, image_size: int, image_dir: str | None,
                    strength: float, cue: str, objects: tuple = (2, 4)) -> dict:
    """One record of the conflict variant. Every random draw is made before and independently of `strength`,
    so the same (seed, split, i) gives the same scene and questions at every strength. image_dir None: no
    image is written (the tokenizer corpus)."""
    domain = CONFLICT_DOMAINS[rng.randrange(len(CONFLICT_DOMAINS))]
    cells = sorted(rng.sample(range(4), rng.randint(*objects)))       # 'objects': (fewest, most) shapes
    scene = {"objects": [{"colour": rng.choice(WHEEL), "shape": rng.choice(SHAPES), "cell": c} for c in cells]}
    if cue in ("image", "both"):
        scene["frame"] = domain
    qa = []
    for o in rng.sample(scene["objects"], min(len(cells), rng.randint(1, 2))):   # one or two turns, different cells
        what = o["shape"] if rng.random() < 0.5 else "shape"
        qa.append((f"What color is the {what} in the {CELLS[o['cell']]}?" + SHORT,
                   conflict_answer(domain, o["colour"], strength)))
    marker = f"[{domain}] " if cue in ("marker", "both") else ""
    qa[0] = (IMAGE_PLACEHOLDER + "\n" + marker + qa[0][0], qa[0][1])
    rec = {"id": f"{split}-{i:06d}", "domain": domain, "domain_index": CONFLICT_DOMAINS.index(domain),
           "image": f"{split}/{i:06d}.png", "scene": scene,
           "conversations": [{"from": f, "value": v} for q, a in qa for f, v in (("human", q), ("gpt", a))]}
    if image_dir is not None:
        conflict_image(scene, image_size).save(os.path.join(image_dir, rec["image"]), compress_level=1)
    return rec


def conflict_meta(strength: float, cue: str, objects: tuple) -> dict:
    return {"strength": strength, "cue": cue, "objects": list(objects), "domains": list(CONFLICT_DOMAINS), "wheel": list(WHEEL),
            "conflicted_colours": list(conflicted_colours(strength)),
            "rule": "domain k (its index in 'domains') names a conflicted colour by the one k steps round 'wheel', "
                    "every other colour as it is",
            "ideal_routing": {d: k for k, d in enumerate(CONFLICT_DOMAINS)},
            "ideal_routing_scope": "tokens at the positions that predict an answer token; one expert per domain, up "
                                   "to naming the experts (purity = the best one-to-one match of domains to experts)",
            "domain_blind_ceiling": domain_blind_ceiling(strength)}


SYNTHETIC_VARIANTS = ("default", "conflict")


def build_synthetic_dataset(out_dir: str, seed: int = 0, n_train: int = 4000, n_val: int = 200,
                            n_test: int = 400, image_size: int = 48, vocab_size: int = 1024,
                            variant: str = "default", conflict_strength: float = 1.0,
                            conflict_cue: str = "marker", conflict_objects: tuple = (2, 4)) -> dict:
    """Write the synthetic dataset; deterministic in (seed, sizes). Returns {name: path} of what it wrote.

    | file (under out_dir)                            | contents                                                |
    |-------------------------------------------------|---------------------------------------------------------|
    | images/{train,val,test}/NNNNNN.png              | rendered scenes, image_size x image_size RGB            |
    | train.json, val.json, test.json                 | LLaVA JSON (§3.8) for stages II/III, ~10% text-only;    |
    |                                                 | extra keys "domain" and "scene" for per-domain analysis |
    | pretrain.json                                   | stage-I captions of the train images (plain template)   |
    | eval/pope/llava_pope_test.jsonl                 | {question_id, image, text, category}                    |
    | eval/pope/coco_pope_{adversarial,popular,       | JSON lines {question_id, image, text, label: yes|no} in |
    |   random}.json                                  | question order; a yes and a no per image and category   |
    | eval/scienceqa/problems.json                    | {pid: {question, choices, answer (index), hint,         |
    |                                                 | image (path or null), split}}; some without image       |
    | eval/scienceqa/pid_splits.json                  | {"train": [], "val": [], "test": [pid, ...]}            |
    | eval/scienceqa/llava_test_CQM-A.json            | LLaVA JSON "<image>\nContext: N/A\nQ\nA. ..\nB. .." ->  |
    |                                                 | letter (eval.py appends the letter prompt, §5.2)        |
    | eval/gqa/llava_gqa_testdev_balanced.jsonl       | {question_id, image, text}                              |
    | eval/gqa/testdev_balanced_questions.json        | {question_id: {question, answer, imageId, isBalanced}}  |
    | eval/textvqa/llava_textvqa_val_v051_ocr.jsonl   | {question_id, image, text}: the 2-line form, no OCR line|
    | eval/textvqa/TextVQA_0.5.1_val.json             | {"data": [{question_id, image_id, question, answers}]}  |
    | tokenizer.json                                  | byte-level BPE on this vocabulary; family "phi"         |
    | meta.json                                       | seed, image_size, image_folder, template, domain counts |

    Every "image" path is relative to out_dir/images. Answers of eval questions follow the benchmarks'
    suffixes (single word, or option letter for ScienceQA, which eval.py appends as the original does).

    variant="conflict" (opt-in; the default output is unchanged): the four-domain colour task with conflict by
    construction (see the section above), at `conflict_strength` in [0, 1] with the domain cue `conflict_cue`
    ('marker' | 'image' | 'both'), `conflict_objects` = (fewest, most) shapes per scene. It writes images/, train/val/test.json (records carry "domain" and
    "domain_index"), tokenizer.json and meta.json (its "conflict" entry: the rule, the ideal routing, the
    domain-blind ceiling); no pretrain.json and no eval/ files. Its tokenizer is trained on the strength-0
    answers, so every strength of a seed shares one tokenizer (and one model can move between them).
    """
    check_choice("variant", variant, SYNTHETIC_VARIANTS)
    check_choice("conflict_cue", conflict_cue, CONFLICT_CUES)
    conflict = variant == "conflict"
    conflicted_colours(conflict_strength)                                 # the range check
    image_dir = os.path.join(out_dir, "images")
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        os.makedirs(os.path.join(image_dir, split), exist_ok=True)
        if conflict:
            splits[split] = [conflict_record(split, i, random.Random(f"{seed}/conflict/{split}/{i}"), image_size,
                                             image_dir, conflict_strength, conflict_cue, conflict_objects) for i in range(n)]
            continue
        splits[split] = [_synthetic_record(split, i, random.Random(f"{seed}/{split}/{i}"), image_size, image_dir)
                         for i in range(n)]
    files = {f"{s}.json": recs for s, recs in splits.items()}
    if not conflict:
        pretrain = [{"id": f"cap-{r['id']}", "image": r["image"], "conversations": [
                     {"from": "human", "value": IMAGE_PLACEHOLDER + "\nDescribe the image briefly."},
                     {"from": "gpt", "value": synthetic_caption(r["scene"])}]} for r in splits["train"] if "scene" in r]
        files |= {"pretrain.json": pretrain}
        files |= {f"eval/{k}": v for k, v in _synthetic_eval_files(splits["test"], seed).items()}
    domains = {s: dict(sorted(Counter(r["domain"] for r in recs).items())) for s, recs in splits.items()}
    files["meta.json"] = {"seed": seed, "image_size": image_size, "image_folder": "images", "template": "phi",
                          "tokenizer": "tokenizer.json", "tokenizer_family": "phi", "splits": domains}
    if conflict:
        files["meta.json"] |= {"variant": "conflict", "conflict": conflict_meta(conflict_strength, conflict_cue,
                                                                                  conflict_objects)}
    paths = {}
    for name, obj in files.items():
        paths[name] = path = os.path.join(out_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            if name.endswith(".jsonl") or name.startswith("eval/pope/coco_pope_"):  # JSON lines
                f.writelines(json.dumps(x) + "\n" for x in obj)
            else:
                json.dump(obj, f, indent=1)
    # The tokenizer learns from the rendered conversations; "<image>" is cut out first (it is split off
    # before encoding, §3.4), so no merge can ever spell it, and <|endoftext|> is a special token.
    phi, lists = TEMPLATES["phi"], [recs for recs in files.values() if isinstance(recs, list)]
    if conflict:                         # the strength-0 conversations: one tokenizer for every strength
        lists = [[conflict_record(s, i, random.Random(f"{seed}/conflict/{s}/{i}"), image_size, None, 0.0, conflict_cue,
                                  conflict_objects)
                  for i in range(len(recs))] for s, recs in splits.items()]
    corpus = [phi.render([t["value"] for t in r["conversations"]]) for recs in lists for r in recs
              if "conversations" in r]
    corpus += [x["text"] for recs in lists for x in recs if "text" in x] + [SYSTEM_LLAVA]
    corpus = [t.replace(IMAGE_PLACEHOLDER, "").replace(phi.sep2, "\n") for t in corpus]
    tk = train_bpe_tokenizer(corpus, vocab_size, ["<|endoftext|>", "<|extra_0|>"])
    paths["tokenizer.json"] = os.path.join(out_dir, "tokenizer.json")
    tk.save(paths["tokenizer.json"])
    paths["image_folder"] = image_dir
    return paths


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Build the synthetic multi-domain dataset.")
    p.add_argument("--out", required=True)
    for arg, default in (("seed", 0), ("n-train", 4000), ("n-val", 200), ("n-test", 400), ("image-size", 48)):
        p.add_argument(f"--{arg}", type=int, default=default)
    p.add_argument("--variant", default="default", choices=SYNTHETIC_VARIANTS,
                   help="'conflict': four domains with token gradient conflict by construction (bench/testbed.py)")
    p.add_argument("--conflict-strength", type=float, default=1.0, help="conflict: the dial, 0 (none) to 1 (complete)")
    p.add_argument("--conflict-cue", default="marker", choices=CONFLICT_CUES, help="conflict: how the domain shows")
    a = p.parse_args()
    paths = build_synthetic_dataset(a.out, a.seed, a.n_train, a.n_val, a.n_test, a.image_size, variant=a.variant,
                                    conflict_strength=a.conflict_strength, conflict_cue=a.conflict_cue)
    print(f"wrote the synthetic dataset to {a.out}: " + ", ".join(k for k in paths if not k.startswith("eval/")))
