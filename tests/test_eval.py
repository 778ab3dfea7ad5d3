"""eval.py and benchmarks.py: every metric on hand-made fixtures in its benchmark's official file format (expected
numbers worked out by hand in the comments), the answer normalisation edge cases, and the runner end to end on a
tiny random model and the synthetic dataset: answer files, resume, sharding, determinism, clear errors."""
import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image

import benchmarks as B
import data
import eval as ev
from benchmarks import DataFileError
from data import Tokenizer
from model import IMAGE_TOKEN_INDEX, LlavaConfig, LlavaModel, LMConfig, VisionConfig
from moe import MoEConfig
from stgc import STGCConfig, find_conflicts

SHORT, LETTER = B.SHORT, B.LETTER


def write_jsonl(path, recs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def answers_for(questions, texts):
    """Answer records as the runner writes them, for the questions whose id is in texts."""
    return [{"question_id": q.question_id, "prompt": q.prompt, "text": texts[q.question_id], **q.extra}
            for q in questions if q.question_id in texts]

# -----------------------------------------------------------------------------
# EvalAI answer normalisation (docs/moe_llava.md §5.3)


@pytest.mark.parametrize("raw,expected", [
    ("Two dogs.", "2 dogs"),                 # number word; trailing period
    ("3.5", "3.5"),                          # a period before a digit stays
    ("3.", "3"),
    ("1,000", "1000"),                       # ',' is deleted by word_tokenize, before punctuation
    ("Yes!", "yes"),                         # '!' not next to a space: becomes a space, then split away
    ("black-and-white", "black and white"),
    ("up - down", "up down"),                # ' -' present: '-' deleted
    ("hot dog / sandwich", "hot dog sandwich"),
    ("(left)", "left"),
    ("what?", "what"),
    ("\tcat\n", "cat"),
    ("The man's hat", "man 's hat"),         # "'s" split off; article dropped
    ("an apple", "apple"),
    ("none", "0"), ("Ten", "10"), ("eleven", "eleven"),
    ("Dont", "don't"), ("youre", "you're"), ("twas", "'twas"),
    ("Im", "im"),                            # table quirk: key "Im" is capitalised, never matches
    ("Ive", "ive"),
    ("somebody'd", "somebodyd"),             # table quirk: reversed entry
    ("a" + "." * 40, "a" + "." * 8),         # re.UNICODE passed as count: only 32 periods removed
])
def test_evalai_normalize(raw, expected):
    assert B.evalai_normalize(raw) == expected


def test_process_punctuation_digit_comma_rule():
    # vqaEval.py's ground-truth side keeps commas, so its digit-comma-digit rule fires: every listed character
    # is then deleted instead of replaced by a space
    assert B.process_punctuation("1,000-2,000") == "10002000"
    assert B.process_punctuation("10-20") == "10 20"
    assert B.process_punctuation("a, b") == "a b"               # ', ' present: ',' deleted
    assert B.process_punctuation("a,b") == "a b"                # no space next to it, no digits: a space
    assert B.process_punctuation("x." * 33) == "x" * 32 + "x."  # the 33rd period survives


def test_contraction_table_is_the_official_one():
    assert len(B.CONTRACTIONS) == 120
    assert {"Im", "Ive", "Id've", "I'dve"} <= set(B.CONTRACTIONS)
    assert B.CONTRACTIONS["somebody'd"] == "somebodyd" and B.CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert len(B.PUNCTUATION) == 21

# -----------------------------------------------------------------------------
# VQA accuracy (vqaEval.py) and TextVQA (m4c)


def test_vqa_accuracy_hand_checked():
    # "Two" -> "2". Annotators answering "2" see 2 other "2"s (2/3); those answering "3" see all 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert B.vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # one matching annotator: 9 of the 10 subsets hold it once: 9 * (1/3) / 10
    assert B.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    # differing ground truth is punctuation-processed: "black-and-white" -> "black and white" (3 of 10)
    assert B.vqa_accuracy("Black and white", ["black-and-white"] * 3 + ["white"] * 7) == pytest.approx(0.9)
    # quirk: identical ground truth is left raw, and digit/article processing never touches it
    assert B.vqa_accuracy("two", ["two"] * 10) == 0.0
    assert B.vqa_accuracy("2", ["2"] * 10) == 1.0


def test_textvqa_soft_accuracy_hand_checked():
    # 2 of 10 say "red": dropping a red leaves 1 (1/3), dropping a blue leaves 2 (2/3): (2/3 + 16/3) / 10
    assert B.textvqa_accuracy("Red.", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert B.textvqa_accuracy("blue", ["red"] * 2 + ["blue"] * 8) == pytest.approx(1.0)
    assert B.textvqa_accuracy("green", ["red"] * 2 + ["blue"] * 8) == 0.0
    # ground truth is normalised too: "Coca-Cola" and "coca cola" are one answer (3 of 10)
    assert B.textvqa_accuracy("COCA COLA", ["Coca-Cola"] * 2 + ["coca cola"] + ["coke"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="exactly 10"):
        B.textvqa_accuracy("x", ["x"] * 9)


@pytest.mark.parametrize("prompt,question", [
    ("what is the brand?\nReference OCR token: dakota, digital" + SHORT, "what is the brand?"),
    ("Reference OCR token: 2016\nWhat year is it?" + SHORT, "what year is it?"),
    ("What word is shown?" + SHORT, "what word is shown?"),
    ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
])
def test_textvqa_question_from_prompt(prompt, question):
    assert B.textvqa_question(prompt) == question


def test_textvqa_unknown_prompt_form():
    with pytest.raises(ValueError, match="none of the known forms"):
        B.textvqa_question("one\ntwo\nthree\nfour")

# -----------------------------------------------------------------------------
# Answer parsers


@pytest.mark.parametrize("text,letter", [
    ("A", "A"), ("B. blue", "B"), ("The answer is C.", "C"), ("Hmm. The answer is D because", "D"),
    ("The answer is B.", "B"),
    ("The answer is A. The answer is B.", "FAILED"),    # two matches
    ("The answer is B", "FAILED"),                      # the regex's unescaped '.' needs one more character
    ("A.", "FAILED"),                                   # "X. " needs 3 characters
    ("b", "FAILED"), ("E", "E"), (" A", "FAILED"),      # no stripping, no lower-casing
    # the official tests membership in the list ["A", ..., "E"], not in the string "ABCDE"
    ("", "FAILED"), ("AB", "FAILED"), ("ABC", "FAILED"), ("BC", "FAILED"), ("ABCDE", "FAILED"),
])
def test_sqa_letter(text, letter):
    assert B.sqa_letter(text) == letter


@pytest.mark.parametrize("text,label", [
    ("Yes", "yes"), ("No, there is not.", "no"), ("There is a cat.", "yes"),
    ("Not at all", "yes"),                 # only "No", "no", "not" count: "Not" is a yes
    ("yes. no", "yes"),                    # only the first sentence
    ("I see no dog", "no"), ("no,", "no"), ("nope", "yes"),
])
def test_pope_yes_no(text, label):
    assert B.pope_yes_no(text) == label


@pytest.mark.parametrize("text,label", [
    ("Yes", "yes"), ("No.", "no"), ("Yes, it is", "yes"), ("I think yes", "other"), ("nope", "no"),
    ("Not sure", "no"), ("", "other"),
])
def test_mme_yes_no(text, label):
    assert B.mme_yes_no(text) == label


def test_mmbench_letter():
    opts = {"A": "dog", "B": "cat", "C": "bird"}
    assert B.mmbench_letter("B", opts) == "B"
    assert B.mmbench_letter("The answer is (C).", opts) == "C"
    assert B.mmbench_letter("a cat", opts) == "B"            # no letter word: the option text
    assert B.mmbench_letter("A or B", opts) is None           # two letters, no option text
    assert B.mmbench_letter("I don't know", opts) is None


@pytest.mark.parametrize("target,pred,ok", [
    ("12", "12.5", True),          # 4.2% off
    ("12", "12.7", False),         # 5.8% off
    ("50%", "0.5", True), ("Yes", "yes", True), ("12", "12%", False),
    ("0", "0.0", False),           # a zero target falls back to exact match (pix2struct quirk)
])
def test_relaxed_correctness(target, pred, ok):
    assert B.relaxed_correctness(target, pred) is ok


@pytest.mark.parametrize("answers,pred,score", [
    (["Paris"], "paris", 1.0), (["Paris"], "Pari", 0.8), (["Paris"], "Parxx", 0.6),
    (["Paris"], "Pa", 0.0),                    # NL 0.6: 1 - 0.6 < 0.5
    (["ab"], "ax", 0.5),                       # exactly at tau: kept (the script zeroes only below it)
    ([" Paris "], "pari", 6 / 7),              # distance on stripped text, length on the raw one (quirk)
    (["London", "Paris"], "Pari", 0.8),        # best answer
])
def test_anls(answers, pred, score):
    assert B.anls(pred, answers) == pytest.approx(score)

# -----------------------------------------------------------------------------
# Each benchmark in its official files


def test_vqav2_submission_and_local_accuracy(tmp_path):
    d = tmp_path / "vqav2"
    qs = [{"question_id": i, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"Question {i}?" + SHORT} for i in (1, 2, 3)]
    qfile = write_jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", qs)
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", qs + [{"question_id": 4, "image": "x.jpg", "text": "?"}])
    ann = [{"question_id": 1, "answer_type": "number", "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(["2"] * 3 + ["3"] * 7)]},
           {"question_id": 2, "answer_type": "yes/no", "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(["yes"] + ["no"] * 9)]},
           {"question_id": 3, "answer_type": "other", "answers": [{"answer": "black and white", "answer_id": k + 1} for k in range(10)]}]
    write_json(d / "v2_mscoco_val2014_annotations.json", {"annotations": ann})
    questions, gold = B.load_vqav2(qfile, str(tmp_path), None, "/img")
    assert questions[0].image == "/img/COCO_test2015_000000000001.jpg" and questions[0].user.startswith("<image>\n")
    m = B.score_vqav2(answers_for(questions, {1: "Two.", 2: "Yes!", 3: "black-and-white"}), questions, gold,
                      str(tmp_path / "out"), "m")
    # the upload covers the full test2015 list, normalised, "" where not answered
    assert json.load(open(m["submission"])) == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "yes"},
                                                {"question_id": 3, "answer": "black and white"}, {"question_id": 4, "answer": ""}]
    assert m["accuracy"] == pytest.approx((0.9 + 0.3 + 1.0) / 3 * 100)
    assert m["per_answer_type"] == pytest.approx({"number": 90.0, "other": 100.0, "yes/no": 30.0})


def test_vizwiz_submission_and_accuracy_with_unanswerable(tmp_path):
    d = tmp_path / "vizwiz"
    suffix = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    qfile = write_jsonl(d / "llava_test.jsonl", [{"question_id": i, "image": f"VizWiz_val_{i:08d}.jpg", "text": "What?" + suffix}
                                                 for i in range(3)])
    write_json(d / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 2 + [{"answer": "blurry", "answer_confidence": "no"}] * 8},
        {"image": "VizWiz_val_00000001.jpg", "answer_type": "other",
         "answers": [{"answer": "coca cola", "answer_confidence": "yes"}] * 4 + [{"answer": "coke", "answer_confidence": "yes"}] * 6}])
    questions, gold = B.load_vizwiz(qfile, str(tmp_path), None, str(d / "test"))
    m = B.score_vizwiz(answers_for(questions, {0: "Unanswerable", 1: "Coca-Cola"}), questions, gold, str(tmp_path / "o"), "m")
    assert json.load(open(m["submission"])) == [{"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"},
                                                {"image": "VizWiz_val_00000001.jpg", "answer": "coca cola"},
                                                {"image": "VizWiz_val_00000002.jpg", "answer": ""}]
    # unanswerable: 2 of 10 (0.6, as TextVQA's red); coca cola: 4 of 10, every subset keeps >= 3 (1.0)
    assert m["accuracy"] == pytest.approx(80.0) and m["n_scored"] == 2
    assert m["per_answer_type"] == pytest.approx({"other": 100.0, "unanswerable": 60.0})


def test_gqa_exact_match_over_balanced_questions(tmp_path):
    qfile = write_jsonl(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl",
                        [{"question_id": q, "image": f"n{q}.jpg", "text": "Q?" + SHORT} for q in ("201", "202", "203", "204")])
    t = lambda s: {"structural": s, "semantic": "rel", "detailed": "d"}   # noqa: E731
    write_json(tmp_path / "gqa" / "testdev_balanced_questions.json", {
        "201": {"answer": "yes", "isBalanced": True, "types": t("verify")},
        "202": {"answer": "dirt", "isBalanced": True, "types": t("query")},
        "203": {"answer": "blue", "isBalanced": True, "types": t("query")},
        "204": {"answer": "left", "isBalanced": False, "types": t("query")}})
    questions, gold = B.load_gqa(qfile, str(tmp_path), None, "")
    m = B.score_gqa(answers_for(questions, {"201": "Yes.", "202": "The dirt", "203": "blue.", "204": "left"}),
                    questions, gold, str(tmp_path / "o"), "m")
    # "Yes." -> "yes" right; "the dirt" != "dirt" (no article handling); "blue." right; 204 is not balanced
    assert m["accuracy"] == pytest.approx(200 / 3) and m["n"] == 3
    assert m["per_type"]["binary"] == 100.0 and m["per_type"]["open"] == 50.0
    assert json.load(open(m["predictions"]))[1] == {"questionId": "202", "prediction": "the dirt"}


GQA_OFFICIAL = os.path.join("gqa", "data", "questions1.2", "testdev_balanced_questions.json")   # gqa.sh
GQA_FLAT = os.path.join("gqa", "testdev_balanced_questions.json")


@pytest.mark.parametrize("layout", [GQA_OFFICIAL, GQA_FLAT])
def test_gqa_annotations_in_either_layout(tmp_path, layout):
    qfile = write_jsonl(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl",
                        [{"question_id": "201", "image": "n1.jpg", "text": "Q?" + SHORT}])
    write_json(tmp_path / layout, {"201": {"answer": "yes", "isBalanced": True}})
    questions, gold = B.load_gqa(qfile, str(tmp_path), None, "")
    assert B.score_gqa(answers_for(questions, {"201": "Yes"}), questions, gold, str(tmp_path / "o"), "m")["accuracy"] == 100.0


def test_gqa_missing_annotations_name_both_layouts(tmp_path):
    qfile = write_jsonl(tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl",
                        [{"question_id": "201", "image": "n1.jpg", "text": "Q?" + SHORT}])
    with pytest.raises(DataFileError) as e:
        B.load_gqa(qfile, str(tmp_path), None, "")
    assert str(tmp_path / GQA_OFFICIAL) in str(e.value) and str(tmp_path / GQA_FLAT) in str(e.value)


def sqa_fixture(root):
    d = root / "scienceqa"
    problems = {"10": {"choices": ["a", "b", "c"], "answer": 1, "image": "image.png", "split": "test"},
                "11": {"choices": ["a", "b"], "answer": 0, "image": "image.png", "split": "test"},
                "12": {"choices": ["x", "y", "z"], "answer": 2, "image": None, "split": "test"},
                "13": {"choices": ["p", "q"], "answer": 0, "image": None, "split": "test"},
                "14": {"choices": ["p", "q"], "answer": 1, "image": "image.png", "split": "test"},
                "15": {"choices": ["p", "q"], "answer": 0, "image": None, "split": "test"},     # never asked
                "99": {"choices": ["p", "q"], "answer": 0, "image": None, "split": "val"}}
    write_json(d / "problems.json", problems)
    write_json(d / "pid_splits.json", {"train": [], "val": ["99"], "test": ["10", "11", "12", "13", "14", "15"]})
    recs = []
    for pid in ("10", "11", "12", "13", "14", "99"):
        p = problems[pid]
        q = "Context: N/A\nWhich one?\n" + "\n".join(f"{'ABC'[k]}. {c}" for k, c in enumerate(p["choices"]))
        recs.append({"id": pid, **({"image": f"{pid}/image.png"} if p["image"] else {}),
                     "conversations": [{"from": "human", "value": ("<image>\n" if p["image"] else "") + q},
                                       {"from": "gpt", "value": "ABC"[p["answer"]]}]})
    return write_json(d / "llava_test_CQM-A.json", recs)


def test_scienceqa_prompts_and_img_accuracy(tmp_path):
    qfile = sqa_fixture(tmp_path)
    questions, gold = B.load_scienceqa(qfile, str(tmp_path), None, "/sqa")
    q10, q12 = questions[0], questions[2]
    assert q10.user == "<image>\nContext: N/A\nWhich one?\nA. a\nB. b\nC. c" + LETTER == q10.prompt
    assert q10.image == "/sqa/10/image.png"
    assert q12.user == "Context: N/A\nWhich one?\nA. x\nB. y\nC. z" + LETTER and q12.image is None
    texts = {"10": "B", "11": "A.", "12": "The answer is C.", "13": "A", "14": "C", "99": "A"}
    m = B.score_scienceqa(answers_for(questions, texts), questions, gold, str(tmp_path / "o"), "m")
    # 10 right; 11 FAILED ("A."); 12 right (regex); 13 right; 14 wrong ("C" with 2 choices); 99 is not test;
    # 15 was not asked. Accuracy 3/5; image problems 10, 11, 14: 1/3
    assert (m["accuracy"], m["img_accuracy"], m["n"], m["n_img"]) == (pytest.approx(60.0), pytest.approx(100 / 3), 5, 3)
    res = json.load(open(m["results"]))
    assert res["results"] == {"10": 1, "11": -1, "12": 2, "13": 0, "14": -1} and res["correct"] == 3


def test_scienceqa_unanswered_and_unparsable_count_wrong_as_the_official(tmp_path):
    """eval_science_qa.py scores every test problem: one without an answer is FAILED (wrong) with the prompt
    'Unknown', so it lowers the accuracy but is outside IMG accuracy (the modality is read off the prompt)."""
    qfile = sqa_fixture(tmp_path)
    questions, gold = B.load_scienceqa(qfile, str(tmp_path), None, "/sqa")
    texts = {"10": "BC", "12": "The answer is C.", "13": "", "14": "B"}        # 11 (an image problem) unanswered
    m = B.score_scienceqa(answers_for(questions, texts), questions, gold, str(tmp_path / "o"), "m")
    # 10 (answer B of 3): "BC" FAILED; 11 FAILED (no answer); 12 right; 13 (answer A): "" FAILED; 14 right.
    # Accuracy 2 of the 5 asked test problems; IMG over the answered image problems 10, 14: 1/2
    assert (m["accuracy"], m["img_accuracy"]) == (pytest.approx(40.0), pytest.approx(50.0))
    assert (m["n"], m["n_scored"], m["n_img"], m["n_img_unanswered"]) == (4, 5, 2, 1)
    res = json.load(open(m["results"]))
    assert res["results"] == {"10": -1, "11": -1, "12": 2, "13": -1, "14": 1}
    assert (res["correct"], res["count"], res["outputs"]["11"]) == (2, 5, "FAILED")


def test_textvqa_matches_by_image_id_and_question(tmp_path):
    d = tmp_path / "textvqa"
    qfile = write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", [   # LLaVA's file: question_id holds the image id
        {"question_id": "003a8ae2", "image": "003a8ae2.jpg", "text": "what is the brand?\nReference OCR token: dakota" + SHORT},
        {"question_id": "003a8ae2", "image": "003a8ae2.jpg", "text": "Reference OCR token: 2016\nWhat year is it?" + SHORT}])
    write_json(d / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "003a8ae2", "question": "what is the brand?", "answers": ["dakota"] * 8 + ["Dakota Digital"] * 2},
        {"question_id": 34603, "image_id": "003a8ae2", "question": "What year is it?", "answers": ["2016"] * 2 + ["2015"] * 8}]})
    questions, gold = B.load_textvqa(qfile, str(tmp_path), None, "")
    assert len({q.key for q in questions}) == 2                     # same question_id, different prompts
    answers = [{"question_id": q.question_id, "prompt": q.prompt, "text": t} for q, t in zip(questions, ["Dakota.", "2016"])]
    m = B.score_textvqa(answers, questions, gold, str(tmp_path / "o"), "m")
    assert m["accuracy"] == pytest.approx((1.0 + 0.6) / 2 * 100)


def test_pope_per_category_metrics_and_mean_f1(tmp_path):
    d = tmp_path / "pope"
    adv = [("yes", "Yes"), ("no", "No, there is not."), ("yes", "There is a cat."), ("no", "Not at all"),
           ("yes", "yes. no"), ("no", "I see no dog")]
    rnd = [("yes", "yes"), ("no", "no")]
    order = ["adversarial", "random", "adversarial", "adversarial", "random", "adversarial", "adversarial", "adversarial"]
    qs, labels, texts, it = [], {"adversarial": [], "random": []}, {}, {"adversarial": iter(adv), "random": iter(rnd)}
    for qid, cat in enumerate(order):
        label, text = next(it[cat])
        qs.append({"question_id": qid, "image": f"COCO_val2014_{qid:012d}.jpg", "text": "Is there a dog?" + SHORT, "category": cat})
        labels[cat].append({"question_id": qid, "image": qs[-1]["image"], "text": "Is there a dog?", "label": label})
        texts[qid] = text
    qfile = write_jsonl(d / "llava_pope_test.jsonl", qs)
    for cat, recs in labels.items():                                # MoE-LLaVA's layout: pope/coco/coco_pope_*.json
        write_jsonl(d / "coco" / f"coco_pope_{cat}.json", recs)
    questions, gold = B.load_pope(qfile, str(tmp_path), None, "")
    m = B.score_pope(answers_for(questions, texts), questions, gold, str(tmp_path / "o"), "m")
    a = m["categories"]["adversarial"]
    # parsed: yes no yes yes yes no against yes no yes no yes no: TP 3, FP 1 ("Not at all"), TN 2, FN 0
    assert (a["TP"], a["FP"], a["TN"], a["FN"]) == (3, 1, 2, 0)
    assert a["accuracy"] == pytest.approx(500 / 6) and a["precision"] == pytest.approx(75.0)
    assert a["recall"] == 100.0 and a["f1"] == pytest.approx(600 / 7) and a["yes_ratio"] == pytest.approx(400 / 6)
    assert m["categories"]["random"]["f1"] == 100.0
    assert m["f1_mean"] == pytest.approx((600 / 7 + 100) / 2)
    # a missing answer does not shift the later ones onto the wrong labels
    part = B.score_pope(answers_for(questions, {k: v for k, v in texts.items() if k != 0}), questions, gold, str(tmp_path / "o"), "m")
    assert (part["categories"]["adversarial"]["TP"], part["categories"]["adversarial"]["FP"]) == (2, 1)


def pope_fixture(root, label_edit=None):
    """Two categories in LLaVA's question file, labels in POPE's JSON lines; label_edit(cat, recs) may change them."""
    d = root / "pope"
    qs = [{"question_id": i, "image": f"COCO_val2014_{i % 3:012d}.jpg", "text": f"Is there a {obj} in the image?" + SHORT,
           "category": cat} for i, (obj, cat) in enumerate([("dog", "random"), ("cat", "popular"), ("car", "random"),
                                                            ("cup", "popular"), ("bus", "random")])]
    qfile = write_jsonl(d / "llava_pope_test.jsonl", qs)
    for cat in ("popular", "random"):
        recs = [{"question_id": n, "image": q["image"], "text": q["text"][:-len(SHORT)], "label": "no" if n % 2 else "yes"}
                for n, q in enumerate((q for q in qs if q["category"] == cat), 1)]
        write_jsonl(d / "coco" / f"coco_pope_{cat}.json", label_edit(cat, recs) if label_edit else recs)
    return qfile


def test_pope_aligned_labels_load_and_score(tmp_path):
    qfile = pope_fixture(tmp_path)
    questions, gold = B.load_pope(qfile, str(tmp_path), None, "")
    assert gold["labels"] == {"popular": ["no", "yes"], "random": ["no", "yes", "no"]}
    m = B.score_pope(answers_for(questions, {0: "No", 1: "No", 2: "Yes", 3: "Yes", 4: "Yes"}), questions, gold,
                     str(tmp_path / "o"), "m")
    # random: no yes yes against no yes no: TP 1, FP 1, TN 1 -> F1 2/3; popular: all right -> F1 1
    assert m["categories"]["random"]["f1"] == pytest.approx(200 / 3) and m["f1_mean"] == pytest.approx(250 / 3)


def _swap_random(cat, recs):                          # another label version: same records, another order
    return [recs[1], recs[0], recs[2]] if cat == "random" else recs


def _retext_random(cat, recs):                        # same image, another object asked about
    return [recs[0], recs[1] | {"text": "Is there a bench in the image?"}, recs[2]] if cat == "random" else recs


@pytest.mark.parametrize("edit,first", [(_swap_random, "question 0"), (_retext_random, "question 2")])
def test_pope_misaligned_labels_fail_naming_file_question_and_version(tmp_path, edit, first):
    qfile = pope_fixture(tmp_path, edit)
    with pytest.raises(DataFileError) as e:
        B.load_pope(qfile, str(tmp_path), None, "")
    msg = str(e.value)
    assert "coco_pope_random.json" in msg and f"random {first} " in msg and "\n" not in msg
    assert "e3e39262c85a6a83f26cf5094022a782cb0df58d" in msg            # the POPE commit LLaVA's docs pin


def test_pope_labels_without_image_or_text_cannot_be_checked(tmp_path):
    qfile = pope_fixture(tmp_path, lambda cat, recs: [{"label": r["label"]} for r in recs])
    with pytest.raises(DataFileError, match=r"coco_pope_popular.json.*\['image', 'text'\]"):
        B.load_pope(qfile, str(tmp_path), None, "")


def test_pope_missing_labels_named(tmp_path):
    qfile = write_jsonl(tmp_path / "pope" / "llava_pope_test.jsonl",
                        [{"question_id": 0, "image": "a.jpg", "text": "?", "category": "popular"}])
    with pytest.raises(DataFileError, match="coco_pope_popular.json"):
        B.load_pope(qfile, str(tmp_path), None, "")


def mme_fixture(root):
    rel = root / "MME" / "MME_Benchmark_release_version"
    ex = rel / "existence" / "questions_answers_YN"
    os.makedirs(ex)
    os.makedirs(rel / "existence" / "images")
    (ex / "000000000001.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                                         "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (ex / "000000000002.txt").write_text("Is there a car in this image? Please answer yes or no.\tYes\n"
                                         "Is there a bus in this image? Please answer yes or no.\tNo\n")
    os.makedirs(rel / "code_reasoning")     # a category without images/: txt next to the images
    (rel / "code_reasoning" / "0001.txt").write_text("Is the output 3? Please answer yes or no.\tYes\n"
                                                     "Is the output 5?  Please answer yes or no.\tNo\n")   # two spaces
    qs = []
    for image, questions in (("000000000001", ("dog", "cat")), ("000000000002", ("car", "bus"))):
        for obj in questions:
            qs.append({"question_id": f"existence/{image}.jpg", "image": f"existence/images/{image}.jpg",
                       "text": f"Is there a {obj} in this image? Please answer yes or no." + SHORT, "category": "existence"})
    qs.append({"question_id": "code_reasoning/0001.png", "image": "code_reasoning/0001.png",
               "text": "Is the output 3? Please answer yes or no." + SHORT, "category": "code_reasoning"})
    qs.append({"question_id": "code_reasoning/0001.png", "image": "code_reasoning/0001.png",
               "text": "Is the output 5?" + SHORT, "category": "code_reasoning"})     # suffix re-added with 2 spaces
    return write_jsonl(root / "MME" / "llava_mme.jsonl", qs)


def test_mme_acc_plus_and_totals(tmp_path):
    qfile = mme_fixture(tmp_path)
    questions, gt = B.load_mme(qfile, str(tmp_path), None, "")
    texts = ["Yes", "No", "yes", "Yes, there is", "I think yes", "No"]
    answers = [{"question_id": q.question_id, "prompt": q.prompt, "text": t} for q, t in zip(questions, texts)]
    m = B.score_mme(answers, questions, gt, str(tmp_path / "o"), "m")
    # existence: 3 of 4 right (the bus is "yes"), image 1 fully right: 75 + 50; code_reasoning: "I think yes" is
    # "other" (wrong), "No" right: 50 + 0
    assert m["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4, "other": 0}
    assert m["subtasks"]["code_reasoning"]["score"] == 50.0 and m["subtasks"]["code_reasoning"]["other"] == 1
    assert (m["perception"], m["cognition"]) == (125.0, 50.0) and "count" in m["missing_subtasks"]
    lines = open(os.path.join(m["results_dir"], "code_reasoning.txt")).read().splitlines()
    assert lines[1] == "0001.png\tIs the output 5?  Please answer yes or no.\tNo\tNo"   # calculation.py's format


def test_mme_question_without_ground_truth(tmp_path):
    qfile = mme_fixture(tmp_path)
    with open(qfile, "a") as f:
        f.write(json.dumps({"question_id": "existence/000000000009.jpg", "image": "x.jpg", "text": "Is it?" + SHORT}) + "\n")
    with pytest.raises(DataFileError, match="000000000009.jpg.*no ground truth"):
        B.load_mme(qfile, str(tmp_path), None, "")


def png_b64(colour=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mmbench_fixture(root, with_answers=True):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    img = png_b64()
    rows = [[0, "What color is the car?", "nan", "red", "blue", "green", "", "B", "attribute", img, "s", "l2", "nan", "dev"],
            [1000000, "What color is the car?", "nan", "blue", "green", "red", "", "A", "attribute", img, "s", "l2", "nan", "dev"],
            [1, "Which is larger?", "Look at the picture.", "cat", "dog", "", "", "B", "logic", img, "s", "l2", "nan", "dev"],
            [1000001, "Which is larger?", "Look at the picture.", "dog", "cat", "", "", "A", "logic", "1", "s", "l2", "nan", "dev"]]
    if not with_answers:
        header.remove("answer")
        rows = [r[:7] + r[8:] for r in rows]
    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    os.makedirs(path.parent, exist_ok=True)
    path.write_text("\n".join("\t".join(str(v) for v in r) for r in [header] + rows) + "\n")
    return str(path)


def xlsx_rows(path):
    sheet = zipfile.ZipFile(path).read("xl/worksheets/sheet1.xml").decode()
    return [re.findall(r"<t[^>]*>(.*?)</t>|<v>(.*?)</v>", row) for row in re.findall(r"<row[^>]*>(.*?)</row>", sheet)]


def test_mmbench_prompts_circular_eval_and_xlsx(tmp_path):
    qfile = mmbench_fixture(tmp_path)
    questions, gold = B.load_mmbench(qfile, str(tmp_path), None, "")
    q = questions[2]
    assert q.prompt == "Look at the picture.\nWhich is larger?\nA. cat\nB. dog"     # hint; options stop at the empty C
    assert q.user == "<image>\n" + q.prompt + LETTER
    assert q.extra == {"round_id": 0, "options": ["cat", "dog"], "option_char": ["A", "B"]}
    assert questions[0].prompt == "What color is the car?\nA. red\nB. blue\nC. green"   # 'nan' hint: none
    assert Image.open(io.BytesIO(questions[3].image)).size == (8, 8)                  # "1": the image of row 1
    texts = {0: "B", 1000000: "A. blue", 1: "dog", 1000001: "B"}
    m = B.score_mmbench(answers_for(questions, texts), questions, gold, str(tmp_path / "o"), "m")
    # question 0: both copies right; question 1: main right ("dog" is option B), copy wrong -> circular 1/2
    assert m["circular_accuracy"] == 50.0 and m["vanilla_accuracy"] == 100.0 and m["n_circular"] == 2
    assert m["per_category"] == {"attribute": 100.0, "logic": 0.0}
    rows = xlsx_rows(m["submission"])
    assert [a for a, _ in rows[0]] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[1][0] == ("", "0") and rows[1][6] == ("B", "") and rows[2][6] == ("A. blue", "")


def test_mmbench_without_answers_is_submission_only(tmp_path):
    questions, gold = B.load_mmbench(mmbench_fixture(tmp_path, with_answers=False), str(tmp_path), None, "")
    m = B.score_mmbench(answers_for(questions, {0: "B"}), questions, gold, str(tmp_path / "o"), "m")
    assert "circular_accuracy" not in m and os.path.isfile(m["submission"])
    assert "answer" not in [a for a, _ in xlsx_rows(m["submission"])[0]]


def test_mmvet_grader_input(tmp_path):
    qfile = write_jsonl(tmp_path / "mm-vet" / "llava-mm-vet.jsonl",
                        [{"question_id": i, "image": f"v1_{i}.png", "text": "Describe."} for i in (0, 5)])
    questions, _ = B.load_with_images(qfile, str(tmp_path), None, "")
    m = B.score_mmvet(answers_for(questions, {0: "a cat", 5: "two dogs"}), questions, None, str(tmp_path / "o"), "m")
    assert json.load(open(m["grader_input"])) == {"v1_0": "a cat", "v1_5": "two dogs"}
    assert questions[0].user == "<image>\nDescribe." and B.BENCHMARKS["mmvet"].max_new_tokens == 1024


def test_chartqa_relaxed_accuracy_per_split(tmp_path):
    d = tmp_path / "chartqa" / "test"
    qfile = write_json(d / "test_human.json", [{"imgname": "a.png", "query": "What is the value?", "label": "12"},
                                               {"imgname": "b.png", "query": "Is A larger?", "label": "Yes"}])
    write_json(d / "test_augmented.json", [{"imgname": "c.png", "query": "Share?", "label": "50%"},
                                           {"imgname": "d.png", "query": "Min?", "label": "0"}])
    questions, labels = B.load_chartqa(qfile, str(tmp_path), None, str(d / "png"))
    assert [q.question_id for q in questions] == ["human_0", "human_1", "augmented_0", "augmented_1"]
    assert questions[0].user == "<image>\nWhat is the value?" + SHORT
    texts = {"human_0": "12.5", "human_1": "yes", "augmented_0": "0.5", "augmented_1": "0.0"}
    m = B.score_chartqa(answers_for(questions, texts), questions, labels, str(tmp_path / "o"), "m")
    assert m["per_split"] == {"augmented": 50.0, "human": 100.0} and m["relaxed_accuracy"] == 75.0


def test_docvqa_anls_and_submission(tmp_path):
    qfile = write_json(tmp_path / "docvqa" / "val" / "val_v1.0.json", {"data": [
        {"questionId": 1, "question": "What city?", "image": "documents/a.png", "docId": 1, "answers": ["Paris", "paris, france"]},
        {"questionId": 2, "question": "Date?", "image": "documents/b.png", "docId": 2, "answers": ["ab"]}]})
    questions, gold = B.load_docvqa(qfile, str(tmp_path), None, str(tmp_path / "docvqa" / "val"))
    assert questions[0].image == str(tmp_path / "docvqa" / "val" / "documents" / "a.png")
    m = B.score_docvqa(answers_for(questions, {1: "Pari", 2: "ax"}), questions, gold, str(tmp_path / "o"), "m")
    assert m["anls"] == pytest.approx((0.8 + 0.5) / 2 * 100)
    assert json.load(open(m["submission"])) == [{"questionId": 1, "answer": "Pari"}, {"questionId": 2, "answer": "ax"}]


@pytest.mark.parametrize("content,message", [
    ('{"question_id": 1, "image": "a.jpg", "text": "?"}\n{"question_id": 2, "image": \n', r"llava_gqa_testdev_balanced.jsonl:2: not valid JSON"),
    ('{"question_id": 1, "text": "?"}\n', r"line 1 lacks \['image'\]"),
])
def test_malformed_question_file_is_named(tmp_path, content, message):
    path = tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl"
    os.makedirs(path.parent)
    path.write_text(content)
    with pytest.raises(DataFileError, match=message):
        B.load_gqa(str(path), str(tmp_path), None, "")

# -----------------------------------------------------------------------------
# The runner on a tiny random model and the synthetic dataset

MAX_NEW = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two OpenMP threads on a 2-core machine that is also
    running something else spin-wait for each other (20x slower here); restored for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    paths = data.build_synthetic_dataset(str(root / "syn"), seed=0, n_train=30, n_val=8, n_test=12, image_size=32)
    tok = Tokenizer.from_file(paths["tokenizer.json"], "phi")
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                          num_layers=3, num_heads=4),
                      lm=LMConfig(family="stablelm", vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=192,
                                  num_layers=4, num_heads=4, norm="layernorm", moe=MoEConfig(num_experts=4)))
    ckpt = str(root / "ckpt")
    LlavaModel(cfg).eval().save_pretrained(ckpt, {"data": {"template": "phi", "tokenizer_family": "phi",
                                                           "image_processor": "clip", "image_size": 32, "image_aspect": "pad"}})
    shutil.copy(paths["tokenizer.json"], os.path.join(ckpt, "tokenizer.json"))
    return {"root": root, "syn": str(root / "syn"), "data": str(root / "syn" / "eval"), "ckpt": ckpt}


def config(setup, out, **kw):
    kw = {"benchmark": "gqa,pope", "max_new_tokens": MAX_NEW, "batch_size": 4, "data": setup["data"]} | kw
    return ev.EvalConfig(checkpoint=setup["ckpt"], out=str(out), **kw)


def merged(out, name, model_id="ckpt"):
    return open(os.path.join(out, "answers", name, model_id, "merge.jsonl"), "rb").read()


@pytest.fixture(scope="module")
def full_run(setup):
    """Every synthetic benchmark, with the conflict statistics on the validation split."""
    out = setup["root"] / "full"
    results = ev.run(config(setup, out, benchmark="all", conflicts=os.path.join(setup["syn"], "val.json"),
                            conflict_samples=4), rank=0, world=1)
    return out, results


def test_end_to_end_writes_answers_metrics_and_analysis(setup, full_run):
    out, results = full_run
    assert set(results) == {"gqa", "scienceqa", "textvqa", "pope"}     # the synthetic set's four benchmarks
    for name, m in results.items():
        bench = B.BENCHMARKS[name]
        questions, gold = ev.load_benchmark(config(setup, out), name)
        answers = [json.loads(line) for line in merged(out, name).decode().splitlines()]
        assert [a["question_id"] for a in answers] == [q.question_id for q in questions] and m["n_questions"] == len(questions)
        assert all(set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for a in answers)
        assert all(a["model_id"] == "ckpt" and len(a["answer_id"]) == 22 for a in answers)
        rescored = bench.score(answers, questions, gold, str(out / "rescore"), "ckpt")
        assert rescored[bench.headline] == m[bench.headline]                  # the file holds what was scored
    saved = json.load(open(out / "results.json"))
    assert saved["benchmarks"]["pope"]["f1_mean"] == results["pope"]["f1_mean"] and saved["model_id"] == "ckpt"
    assert os.path.isfile(out / "upload" / "gqa" / "testdev_balanced_predictions.json")
    table = ev.format_table(results)
    assert re.search(r"pope\s+f1_mean\s+\d+\.\d\d\s+\d+/\d+", table)


def test_expert_loading_counts_every_token(setup, full_run):
    out, results = full_run
    loading = json.load(open(out / "analysis" / "expert_loading.json"))
    n_pope = results["pope"]["n_questions"]
    pope = loading["pope"]
    assert pope["layers"] == [0, 2] and pope["num_experts"] == 4
    assert pope["tokens"]["image"] == 16 * n_pope                             # 4x4 patches per image
    assert 0 < pope["tokens"]["answer"] <= (MAX_NEW - 1) * n_pope             # generated tokens fed back in
    for kind in ("image", "text", "answer", "total"):
        for layer in pope["all"][kind] + pope["top1"][kind]:
            assert sum(layer) == pytest.approx(1.0)
    # SQA has text-only problems: fewer image tokens than questions x 16
    assert loading["scienceqa"]["tokens"]["image"] < 16 * results["scienceqa"]["n_questions"]


def test_expert_loading_prefill_equals_forward_routing(setup):
    model, tok, data_cfg, template = ev.load_model(config(setup, "x"), torch.device("cpu"))
    loading = ev.ExpertLoading(model)
    ids = tok.tokenize_with_images(template.render(["<image>\nWhat color is the circle?"]))
    image = torch.randn(1, 3, 32, 32)
    loading.begin([ids])
    new = model.generate([ids], image, max_new_tokens=1)                     # prefill only: no decoding call
    loading.end(new)
    with torch.no_grad():
        routing = model(torch.tensor([ids]), image).routing
    kinds = torch.tensor(ev.prompt_kinds(ids, 16))
    for slot, r in enumerate(routing):
        onehot = torch.nn.functional.one_hot(r.experts, 4).float()           # [S, K, E]
        assert torch.equal(loading.all[slot, 0], onehot[kinds == 0].sum((0, 1)))   # image tokens
        assert torch.equal(loading.all[slot, 1], onehot[kinds == 1].sum((0, 1)))   # text tokens
        assert torch.equal(loading.top1[slot, 1], onehot[kinds == 1][:, 0].sum(0))
    assert loading.all[:, 2].sum() == 0
    for h in loading.hooks:
        h.remove()


def test_expert_loading_pathways_and_coactivation_equal_direct_counts(setup):
    """eval's activated pathways and co-activation (routing.py) on a prefill equal a direct count, token by token,
    over the routing records of that same generate() call (caught by a second hook)."""
    from collections import Counter
    model, tok, data_cfg, template = ev.load_model(config(setup, "x"), torch.device("cpu"))
    loading = ev.ExpertLoading(model)
    seen = []
    spies = [m.register_forward_hook(lambda mod, i, out: seen.append(out[1])) for _, m in ev.moe_layers(model)]
    prompts = [tok.tokenize_with_images(template.render([q])) for q in ("<image>\nWhat color is the circle?", "Hi there")]
    loading.begin(prompts)
    new = model.generate(prompts, torch.randn(1, 3, 32, 32), max_new_tokens=1)   # prefill only
    loading.end(new)
    summary = loading.summary(2)
    for h in loading.hooks + spies:
        h.remove()
    kinds = loading.prefill.reshape(-1)                                # [S] left padding = -1
    assert len(seen) == 2 and seen[0].experts.shape[0] == kinds.shape[0]
    paths, pairs = {k: Counter() for k in ev.KINDS}, Counter()
    for s in range(kinds.shape[0]):
        if kinds[s] >= 0:
            paths[ev.KINDS[kinds[s]]][tuple(int(r.experts[s, 0]) for r in seen)] += 1
            e0, e1 = seen[0].experts[s].tolist()
            pairs[(min(e0, e1), max(e0, e1))] += 1
    assert loading.paths == paths and sum(paths["image"].values()) == 16
    n = int((kinds >= 0).sum())
    assert summary["routing"][0]["tokens"] == n
    assert {(i, j): round(share * n) for i, j, share in summary["routing"][0]["coactivation"]} == dict(pairs)
    total = sum(paths.values(), Counter())
    assert summary["distinct_pathways"]["total"] == len(total)
    assert [tuple(p) for p, _, _ in summary["pathways"]["total"]] == [p for p, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))][:10]


def test_routing_analysis_files(full_run):
    """Per benchmark: routing measures and pathways in expert_loading.json, a pathway plot where matplotlib is;
    purity / NMI across the benchmarks; on the labelled split, per-kind consistency and domain purity / NMI."""
    out, results = full_run
    loading = json.load(open(out / "analysis" / "expert_loading.json"))
    for name, a in loading.items():
        assert [x["layer"] for x in a["routing"]] == a["layers"] and a["pathways"]["total"]
        assert all(0 <= x["utilisation"] <= 1 and x["load_var"] >= 0 for x in a["routing"])
        assert sum(a["top1_counts"][0]) == sum(a["tokens"].values())
    spec = json.load(open(out / "analysis" / "specialisation.json"))
    assert set(spec["benchmarks"]) == set(results) and all(0 <= x["nmi"] <= 1 for x in spec["layers"])
    try:
        import matplotlib  # noqa: F401
        assert os.path.isfile(out / "analysis" / "pathways_pope.png")
    except ImportError:
        pass
    conflicts = json.load(open(out / "analysis" / "conflicts.json"))
    assert len(conflicts["domains"]) >= 2
    for layer in conflicts["layers"]:
        assert set(layer["per_kind"]["answer"]) == {"pairs", "conflict_ratio", "consistency"}
        assert 0 < layer["domain"]["purity"] <= 1 and layer["routing"]["tokens"] > 0


def test_expert_loading_counts_decoded_tokens_until_eos(setup):
    """Decoding call c feeds back generated token c - 1; it counts while that token is before eos: a sequence
    that stops early stops counting while the other one goes on."""
    model, tok, data_cfg, template = ev.load_model(config(setup, "x"), torch.device("cpu"))
    prompts = [tok.tokenize_with_images(template.render([q])) for q in ("How many circles are there?", "What is 2 plus 3?")]
    free = model.generate(prompts, None, max_new_tokens=5)
    eos = next(t for t in free[0][1:] if t not in free[1])            # ends prompt 0 early, never prompt 1
    loading = ev.ExpertLoading(model)
    loading.begin(prompts)
    new = model.generate(prompts, None, max_new_tokens=5, eos_token_id=eos)
    loading.end(new)
    assert len(new[0]) < 5 and len(new[1]) == 5
    answer_tokens = min(len(new[0]), 4) + 4                          # the last of 5 tokens is never fed back
    assert loading.top1[:, 2].sum(dim=1).tolist() == [answer_tokens] * 2
    assert loading.all[:, 2].sum(dim=1).tolist() == [2 * answer_tokens] * 2      # top-2, nothing dropped at eval
    assert loading.top1[:, 1].sum(dim=1).tolist() == [len(prompts[0]) + len(prompts[1])] * 2
    for h in loading.hooks:
        h.remove()


def test_conflict_statistics_match_find_conflicts(setup, full_run):
    out, _ = full_run
    stats = json.load(open(out / "analysis" / "conflicts.json"))
    assert stats["samples"] == 4 and [l["layer"] for l in stats["layers"]] == [0, 2]
    assert stats["definition"] == "lm_loss"                            # which gradient the statistics are of
    # recompute the single batch (conflict_samples = batch_size = 4) directly
    cfg = config(setup, out)
    model, tok, data_cfg, _ = ev.load_model(cfg, torch.device("cpu"))
    ds = data.LlavaJsonDataset(dataclasses.replace(data_cfg, data_path=os.path.join(setup["syn"], "val.json"),
                                            image_folder=os.path.join(setup["syn"], "images")), tok)
    batch = data.collate([ds[k] for k in range(4)], tok.pad_id, "right", 32)
    out_ = model(batch["input_ids"], batch["images"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    deltas = torch.autograd.grad(out_.loss, [r.output for r in out_.routing])
    for layer, r, d in zip(stats["layers"], out_.routing, deltas):
        c = find_conflicts(r, d.reshape(-1, d.shape[-1]), STGCConfig())
        assert layer["pairs"] == int(c.pair.sum()) > 0
        assert layer["conflict_ratio"] == pytest.approx(float(c.conflict.sum() / c.pair.sum()))
        assert sum(k["pairs"] for k in layer["per_kind"].values()) == layer["pairs"]
        assert sum(e["pairs"] for e in layer["per_expert"]) == layer["pairs"]
        assert layer["per_kind"]["image"]["pairs"] > 0 and layer["per_kind"]["answer"]["pairs"] > 0
    assert all(p.requires_grad for p in model.vision_tower.parameters())


def test_gold_answers_score_perfectly_without_generating(setup, tmp_path):
    """Answer files holding the synthetic gold answers: the rerun generates nothing (every question is done)
    and the official scoring paths give 100."""
    cfg = config(setup, tmp_path, benchmark="all")
    syn = setup["data"]
    golds = {
        "gqa": lambda q: json.load(open(f"{syn}/gqa/testdev_balanced_questions.json"))[q.question_id]["answer"],
        "scienceqa": lambda q: "ABC"[json.load(open(f"{syn}/scienceqa/problems.json"))[q.question_id]["answer"]],
        "textvqa": lambda q: next(g["answers"][0] for g in json.load(open(f"{syn}/textvqa/TextVQA_0.5.1_val.json"))["data"]
                                  if g["question_id"] == q.question_id),
        "pope": lambda q: next(x["label"] for c in B.POPE_CATEGORIES for x in B.read_jsonl(f"{syn}/pope/coco_pope_{c}.json")
                               if x["question_id"] == q.question_id)}
    order = {}
    for name, gold in golds.items():
        questions, _ = ev.load_benchmark(cfg, name)
        order[name] = [q.question_id for q in questions]
        write_jsonl(tmp_path / "answers" / name / "ckpt" / "1_0.jsonl",          # written in reverse order
                    [{"question_id": q.question_id, "prompt": q.prompt, "text": gold(q)} for q in questions[::-1]])
    results = ev.run(cfg, rank=0, world=1)
    assert all(m["generated_now"] == 0 for m in results.values())
    for name in golds:                                                            # merged in question-file order
        assert [json.loads(line)["question_id"] for line in merged(tmp_path, name).decode().splitlines()] == order[name]
    assert results["gqa"]["accuracy"] == 100.0 and results["textvqa"]["accuracy"] == 100.0
    assert results["scienceqa"]["accuracy"] == 100.0 and results["scienceqa"]["img_accuracy"] == 100.0
    assert results["pope"]["f1_mean"] == 100.0 and results["pope"]["accuracy_mean"] == 100.0


@pytest.fixture(scope="module")
def reference_answers(setup):
    out = setup["root"] / "reference"
    ev.run(config(setup, out), rank=0, world=1)
    return {n: merged(out, n) for n in ("gqa", "pope")}


def test_same_checkpoint_twice_gives_identical_files(setup, reference_answers, tmp_path):
    ev.run(config(setup, tmp_path), rank=0, world=1)
    assert {n: merged(tmp_path, n) for n in ("gqa", "pope")} == reference_answers


def test_batched_equals_one_at_a_time(setup, reference_answers, tmp_path):
    ev.run(config(setup, tmp_path, batch_size=1), rank=0, world=1)
    assert {n: merged(tmp_path, n) for n in ("gqa", "pope")} == reference_answers


def test_resume_skips_done_questions_and_repairs_a_cut_line(setup, reference_answers, tmp_path):
    first = ev.run(config(setup, tmp_path, max_samples=5), rank=0, world=1)
    assert first["pope"]["generated_now"] == 5 and first["pope"]["n_questions"] == 5
    shard_file = tmp_path / "answers" / "pope" / "ckpt" / "1_0.jsonl"
    with open(shard_file, "a") as f:
        f.write('{"question_id": 5, "prompt": "Is th')                       # a crash mid-write
    second = ev.run(config(setup, tmp_path), rank=0, world=1)
    n_pope = second["pope"]["n_questions"]
    assert second["pope"]["generated_now"] == n_pope - 5 and second["gqa"]["generated_now"] == second["gqa"]["n_questions"] - 5
    assert {n: merged(tmp_path, n) for n in ("gqa", "pope")} == reference_answers
    lines = shard_file.read_text().splitlines()
    assert len(lines) == n_pope and all(json.loads(line) for line in lines)
    third = ev.run(config(setup, tmp_path), rank=0, world=1)
    assert third["pope"]["generated_now"] == 0 and third["pope"]["f1_mean"] == second["pope"]["f1_mean"]


def test_answers_of_another_checkpoint_are_not_reused(setup, tmp_path, capsys):
    """Retraining into the same checkpoint dir (the demo, or `eval.py --out X` rerun): the answers cached under
    the dir's name are the old model's. They are moved aside, not reused; the same checkpoint reuses its own."""
    ckpt = tmp_path / "ckpt"                                                   # same name, hence same model_id
    shutil.copytree(setup["ckpt"], ckpt)
    cfg = lambda out, **kw: dataclasses.replace(config(setup, out, benchmark="pope", max_samples=4, **kw),  # noqa: E731
                                                checkpoint=str(ckpt))
    first = ev.run(cfg(tmp_path / "eval"), rank=0, world=1)
    assert first["pope"]["generated_now"] == 4
    again = ev.run(cfg(tmp_path / "eval"), rank=0, world=1)
    assert again["pope"]["generated_now"] == 0
    printed, old_answers = capsys.readouterr().out, merged(tmp_path / "eval", "pope")
    model = LlavaModel.from_pretrained(str(ckpt))                              # "retrain": other weights
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(str(ckpt), {"data": json.load(open(ckpt / "config.json"))["data"]})
    second = ev.run(cfg(tmp_path / "eval"), rank=0, world=1)
    assert second["pope"]["generated_now"] == 4
    assert again["pope"]["fingerprint"] == first["pope"]["fingerprint"] != second["pope"]["fingerprint"]
    assert f"reusing 4 of 4 answers of checkpoint {first['pope']['fingerprint']}" in printed
    assert "model.safetensors" in capsys.readouterr().out                      # says what differs
    ev.run(cfg(tmp_path / "fresh"), rank=0, world=1)                           # the second model's own answers
    assert merged(tmp_path / "eval", "pope") == merged(tmp_path / "fresh", "pope")
    kept = tmp_path / "eval" / "answers" / "pope" / "ckpt" / "previous" / first["pope"]["fingerprint"]
    assert (kept / "merge.jsonl").read_bytes() == old_answers                  # the old ones kept
    # an eval setting that changes answers is part of the fingerprint too
    longer = ev.run(cfg(tmp_path / "eval", max_new_tokens=MAX_NEW + 2), rank=0, world=1)
    assert longer["pope"]["generated_now"] == 4 and "max_new_tokens 4 -> 6" in capsys.readouterr().out


def test_sharded_run_merges_rank_files(setup, reference_answers, tmp_path):
    assert ev.shard(list(range(10)), 0, 3) == [0, 1, 2, 3] and ev.shard(list(range(10)), 2, 3) == [8, 9]
    assert ev.run(config(setup, tmp_path), rank=1, world=2) == {}            # rank 1 writes its shard only
    results = ev.run(config(setup, tmp_path), rank=0, world=2)               # rank 0 writes its own, merges
    folder = tmp_path / "answers" / "pope" / "ckpt"
    n = results["pope"]["n_questions"]
    assert len((folder / "2_1.jsonl").read_text().splitlines()) == n - (n + 1) // 2
    assert {name: merged(tmp_path, name) for name in ("gqa", "pope")} == reference_answers


def test_torchrun_two_processes(setup, reference_answers, tmp_path):
    """A real 2-process run (gloo): contiguous shards, barrier, rank 0 merges; loading counts all-reduced."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2", "--master_port=29517",
           "eval.py", "--checkpoint", setup["ckpt"], "--data", setup["data"], "--benchmark", "gqa,pope",
           "--max-new-tokens", str(MAX_NEW), "--batch-size", "4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {n: merged(tmp_path, n) for n in ("gqa", "pope")} == reference_answers
    assert sorted(os.listdir(tmp_path / "answers" / "pope" / "ckpt")) == ["2_0.jsonl", "2_1.jsonl", "fingerprint.json",
                                                                         "merge.jsonl"]
    ref = json.load(open(setup["root"] / "reference" / "analysis" / "expert_loading.json"))
    got = json.load(open(tmp_path / "analysis" / "expert_loading.json"))
    assert got["pope"]["tokens"] == ref["pope"]["tokens"] and got["pope"]["questions"] == ref["pope"]["questions"]
    for kind, layers in ref["pope"]["all"].items():
        assert [v for layer in got["pope"]["all"][kind] for v in layer] == pytest.approx([v for layer in layers for v in layer])
    assert re.search(r"pope\s+f1_mean", proc.stdout)


def test_images_padded_to_square_only_where_the_original_pads(setup, tmp_path, monkeypatch):
    """model_vqa_loader pads (gqa, pope); model_vqa_science does not (scienceqa)."""
    seen = []
    real = ev.process_image
    monkeypatch.setattr(ev, "process_image", lambda img, cfg: seen.append(cfg.image_aspect) or real(img, cfg))
    for name, aspect in (("pope", "pad"), ("scienceqa", "square")):
        seen.clear()
        ev.run(config(setup, tmp_path / name, benchmark=name, max_samples=3, max_new_tokens=1), rank=0, world=1)
        assert seen and set(seen) == {aspect}


def test_cli_arguments():
    cfg = ev.parse_args(["--checkpoint", "ck/run1/", "--benchmark", "vqav2,pope", "--questions", "vqav2=val.jsonl",
                         "--annotations", "vqav2=v2_val.json", "--max-samples", "7", "--no-expert-loading"])
    assert cfg.benchmarks == ["vqav2", "pope"] and cfg.questions == {"vqav2": "val.jsonl"} and cfg.max_samples == 7
    assert cfg.annotations == {"vqav2": "v2_val.json"} and not cfg.expert_loading
    assert cfg.out == os.path.join("ck/run1/", "eval") and cfg.model_id == "run1"
    with pytest.raises(SystemExit):
        ev.parse_args(["--checkpoint", "c", "--questions", "vqav2"])          # not NAME=FILE
    with pytest.raises(SystemExit):
        ev.parse_args(["--checkpoint", "c", "--benchmark", "vqa3"])


def test_prompt_and_stop_tokens(setup):
    model, tok, data_cfg, template = ev.load_model(config(setup, "x"), torch.device("cpu"))
    questions, _ = ev.load_benchmark(config(setup, "x", benchmark="scienceqa"), "scienceqa")
    ps = ev.PromptSet(questions, tok, template, data_cfg)
    text_only = next(i for i, q in enumerate(questions) if q.image is None)
    with_image = next(i for i, q in enumerate(questions) if q.image is not None)
    _, ids, image = ps[with_image]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and image.shape == (3, 32, 32)
    rendered = tok.decode([i for i in ids if i >= 0], skip_special_tokens=False)
    assert rendered.startswith(data.SYSTEM + " USER: ") and rendered.endswith(LETTER + " ASSISTANT:")
    _, ids, image = ps[text_only]
    assert IMAGE_TOKEN_INDEX not in ids and image is None
    assert ev.stop_ids(tok, template) == [tok.eos_id]                        # phi: sep2 is the eos token


def test_checkpoint_data_config_for_hf_dirs():
    clip, siglip = VisionConfig(), VisionConfig(kind="siglip", image_size=384, patch_size=14, act="gelu_pytorch_tanh")
    cases = [({"model_type": "moe_llava_stablelm", "image_aspect_ratio": "pad"}, clip, ("stablelm", "stablelm", "clip", 336, "pad")),
             ({"model_type": "moe_llava_phi"}, siglip, ("phi", "phi", "siglip", 384, "pad")),
             ({"model_type": "moe_llava_qwen"}, clip, ("qwen", "qwen", "clip", 336, "pad")),
             ({"model_type": "llava", "image_aspect_ratio": "square"}, clip, ("vicuna_v1", "llama", "clip", 336, "square")),
             ({"format": "moe-vlm", "data": {"template": "phi", "image_size": 32, "data_path": "x"}}, clip, ("phi", "phi", "clip", 32, "pad"))]
    for config_json, vision, want in cases:
        d = ev.checkpoint_data_config(config_json, vision)
        assert (d.template, d.tokenizer_family, d.image_processor, d.image_size, d.image_aspect) == want


def test_answer_id_is_deterministic_and_shortuuid_shaped():
    a = ev.answer_id("m", "1\x1f0\x1fq")
    assert a == ev.answer_id("m", "1\x1f0\x1fq") != ev.answer_id("m", "2\x1f0\x1fq")
    assert len(a) == 22 and set(a) <= set(ev.SHORTUUID)

# -----------------------------------------------------------------------------
# Clear errors


def copy_synthetic(setup, tmp_path):
    shutil.copytree(setup["syn"], tmp_path / "syn")
    return str(tmp_path / "syn" / "eval")


def test_missing_question_file_is_named(setup, tmp_path):
    with pytest.raises(DataFileError, match=r"mme: question file .*MME/llava_mme.jsonl not found"):
        ev.run(config(setup, tmp_path, benchmark="mme"), rank=0, world=1)
    with pytest.raises(SystemExit, match=r"MME/llava_mme.jsonl not found"):
        ev.main(["--checkpoint", setup["ckpt"], "--data", setup["data"], "--benchmark", "mme", "--out", str(tmp_path)])
    with pytest.raises(DataFileError, match="no benchmark question file"):
        ev.run(config(setup, tmp_path, benchmark="all", data=str(tmp_path)), rank=0, world=1)
    with pytest.raises(ValueError, match="unknown benchmark"):
        config(setup, tmp_path, benchmark="gqa,vqa3")


def test_missing_annotation_and_image_are_named(setup, tmp_path):
    d = copy_synthetic(setup, tmp_path)
    os.remove(os.path.join(d, "gqa", "testdev_balanced_questions.json"))
    with pytest.raises(DataFileError, match=r"GQA annotations: none of .*gqa/testdev_balanced_questions.json'\] exists"):
        ev.run(config(setup, tmp_path, data=d, benchmark="gqa"), rank=0, world=1)
    image = json.loads(open(os.path.join(d, "pope", "llava_pope_test.jsonl")).readline())["image"]
    os.remove(os.path.join(tmp_path, "syn", "images", image))
    with pytest.raises(DataFileError, match=rf"pope: \d+ of \d+ images not found, e.g. \['.*{image}'"):
        ev.run(config(setup, tmp_path, data=d, benchmark="pope"), rank=0, world=1)


def test_malformed_answer_file_is_named(setup, tmp_path):
    folder = tmp_path / "answers" / "gqa" / "ckpt"
    os.makedirs(folder)
    (folder / "1_0.jsonl").write_text('{"question_id": "000000"\n{"question_id": "000001", "prompt": "x", "text": "y"}\n')
    with pytest.raises(DataFileError, match=r"1_0.jsonl:1: not an answer record"):
        ev.run(config(setup, tmp_path, benchmark="gqa"), rank=0, world=1)


def test_conflict_statistics_use_the_checkpoints_stgc_settings(setup, tmp_path):
    """A checkpoint trained with STGC 'full' gradients and tau = 0.5 is measured with those, not the defaults."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["ckpt"], ckpt)
    config_json = json.load(open(ckpt / "config.json"))
    config_json["train_config"] = {"stgc": {"enabled": True, "grad_source": "full", "threshold": 0.5, "mean_scope": "global"}}
    json.dump(config_json, open(ckpt / "config.json", "w"))
    stgc = ev.checkpoint_stgc_config(config_json)
    assert (stgc.grad_source, stgc.threshold, stgc.mean_scope) == ("full", 0.5, "rank")   # rank 0 computes alone
    cfg = dataclasses.replace(config(setup, tmp_path, conflicts=os.path.join(setup["syn"], "val.json"), conflict_samples=4),
                              checkpoint=str(ckpt))
    model, tok, data_cfg, _ = ev.load_model(cfg, torch.device("cpu"))
    stats = ev.conflict_statistics(model, tok, data_cfg, cfg, torch.device("cpu"))
    assert stats["grad_source"] == "full" and stats["threshold"] == 0.5
    default = ev.conflict_statistics(model, tok, data_cfg, cfg, torch.device("cpu"), STGCConfig())
    assert [layer["pairs"] for layer in stats["layers"]] == [layer["pairs"] for layer in default["layers"]]
    assert stats["layers"][0]["conflict_ratio"] > default["layers"][0]["conflict_ratio"]   # tau 0.5 > 0: more conflicts


def test_single_question_mode_answers_as_the_runner_does(setup, reference_answers, capsys):
    """--image FILE --question "...": the greedy answer of the benchmark runner for the same turn, printed."""
    cfg = config(setup, setup["root"] / "reference")
    q = ev.load_benchmark(cfg, "pope")[0][0]
    answer = json.loads(reference_answers["pope"].decode().splitlines()[0])["text"]
    question = q.user.removeprefix(data.IMAGE_PLACEHOLDER + "\n")
    ev.main(["--checkpoint", setup["ckpt"], "--image", q.image, "--question", question, "--max-new-tokens", str(MAX_NEW),
             "--device", "cpu"])
    assert capsys.readouterr().out.strip() == answer
    with pytest.raises(SystemExit):
        ev.parse_args(["--checkpoint", setup["ckpt"], "--image", q.image])     # --image needs --question
