"""
benchmarks.py: what each benchmark of the papers is, file by file: how its official question file becomes
prompts, how its answers are scored, and which official answer / submission file is written. eval.py runs a
model over the questions; everything benchmark-specific lives here (DESIGN.md allows the split past ~1000 lines).

Each metric reproduces the script MoE-LLaVA runs (docs/moe_llava.md §5.2; LLaVA-1.5's eval.zip):

| name       | official question file (under --data)            | metric, as computed by                                   |
|------------|---------------------------------------------------|----------------------------------------------------------|
| vqav2      | vqav2/llava_vqav2_mscoco_test-dev2015.jsonl      | EvalAI submission (convert_vqav2_for_submission.py); VQA |
|            |                                                   | accuracy (vqaEval.py) when annotations are given         |
| gqa        | gqa/llava_gqa_testdev_balanced.jsonl             | convert_gqa_for_eval.py + GQA eval.py: exact match       |
| vizwiz     | vizwiz/llava_test.jsonl                           | EvalAI submission (convert_vizwiz_for_submission.py);    |
|            |                                                   | VQA accuracy incl. 'unanswerable' with val annotations   |
| scienceqa  | scienceqa/llava_test_CQM-A.json                  | eval_science_qa.py letter parsing; SQA-IMG               |
| textvqa    | textvqa/llava_textvqa_val_v051_ocr.jsonl         | eval_textvqa.py + m4c TextVQAAccuracyEvaluator           |
| pope       | pope/llava_pope_test.jsonl                        | eval_pope.py per category; headline mean F1              |
| mme        | MME/llava_mme.jsonl                               | convert_answer_to_mme.py + eval_tool/calculation.py      |
| mmbench    | mmbench/mmbench_dev_20230712.tsv                  | convert_mmbench_for_submission.py (xlsx); local circular |
|            |                                                   | evaluation (exact matching) when the TSV has answers     |
| mmvet      | mm-vet/llava-mm-vet.jsonl                         | convert_mmvet_for_eval.py (the GPT grader's input)       |
| llavabench | llava-bench-in-the-wild/questions.jsonl           | answers JSONL for the GPT judge (eval_gpt_review_bench)  |
| chartqa    | chartqa/test/test_{human,augmented}.json          | relaxed accuracy, 5% numeric tolerance (pix2struct)      |
| docvqa     | docvqa/val/val_v1.0.json                          | ANLS, tau 0.5 (the RRC DocVQA evaluation script)         |

Deliberate deviations from the official scripts (each also commented where it happens):
  * Missing answers (--max-samples, an interrupted run): ScienceQA counts an asked problem without an answer
    as FAILED, as eval_science_qa.py does (over the asked test problems, where the original takes the whole
    test split); every other metric is over the answered questions and reports how many, where the originals
    assume complete runs (GQA's eval.py raises, eval_pope.py pairs answers with labels by order).
  * POPE pairs an answer with the label at the same position within its category, which is the original's
    order-zip for a complete run and stays right when some answers are missing; and it first checks that each
    label's image and question are those of the question at its position (the original does not), so a label
    file of another POPE version fails to load instead of giving a wrong F1.
  * VQA / VizWiz leave-one-out runs over annotator positions. vqaEval.py compares answer dicts, which is the
    same when the dicts are distinct (VQAv2's answer_id); VizWiz's answer dicts have no id.
  * MME: questions of one image are grouped by image (the original pairs consecutive lines of its txt).
    Newlines / tabs inside a prediction are written as spaces in the MME txt (they would break its format).
  * MMBench local score = VLMEvalKit's exact-matching extraction (no ChatGPT fallback, no 'Z' rules);
    the official number comes from the OpenCompass server. The xlsx is written without pandas/openpyxl.
  * POPE / DocVQA / ChartQA divisions by zero give 0 where the originals would raise.
  * TextVQA answers are matched to annotations by (image_id, question) as eval_textvqa.py does, and, for
    question files that carry TextVQA's own question_id (the synthetic dataset), by (question_id, question).
  * ChartQA: relaxed_correctness(target=gold, prediction=answer), as pix2struct defines it (some LLaVA forks
    swap the two arguments, which measures the tolerance relative to the prediction).
"""
import base64
import csv
import json
import math
import os
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable
from xml.sax.saxutils import escape

SHORT = "\nAnswer the question using a single word or phrase."       # LLaVA-1.5 suffixes (§5.1, §5.2)
LETTER = "\nAnswer with the option's letter from the given choices directly."
LETTER_CN = "\n请直接回答选项字母。"
IMAGE = "<image>"


class DataFileError(ValueError):
    """A benchmark file that is missing or not in its official format; the message names the file."""

# -----------------------------------------------------------------------------
# Reading official files, with errors that name the file and the record

def read_json(path):
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path):
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataFileError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def need(rec, keys, path, where):
    """rec must be a dict holding every key; else a DataFileError naming the file and the record."""
    if not isinstance(rec, dict):
        raise DataFileError(f"{path}: {where} is a {type(rec).__name__}, expected an object")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise DataFileError(f"{path}: {where} lacks {missing} (has {sorted(rec)[:8]})")
    return rec


def read_lines_or_json(path):
    """POPE label files are JSON lines despite their .json name; accept a JSON list as well."""
    try:
        return read_jsonl(path)
    except DataFileError:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFileError(f"{path}: expected JSON lines or a JSON list") from None
        return data

# -----------------------------------------------------------------------------
# Questions and benchmarks

@dataclass
class Question:
    question_id: object          # as in the question file (int or str); the answer file keeps it as is
    prompt: str                  # the answer file's "prompt": the original's cur_prompt
    user: str                    # the user turn given to the conversation template ("<image>\n..." with an image)
    image: str | bytes | None = None   # image path, encoded image bytes (MMBench), or None (text-only)
    extra: dict = field(default_factory=dict)   # more answer-file fields (MMBench: round_id, options, option_char)

    @property
    def key(self):
        """Identity for resuming and joining answers: TextVQA's LLaVA file repeats question_id (it holds the
        image id), so the prompt is part of it."""
        return answer_key(self.question_id, self.prompt, self.extra.get("round_id", 0))


def answer_key(question_id, prompt, round_id=0):
    return f"{question_id}\x1f{round_id}\x1f{prompt}"


def record_key(rec: dict):
    return answer_key(rec["question_id"], rec["prompt"], rec.get("round_id", 0))


@dataclass(frozen=True)
class Benchmark:
    name: str
    question_file: str           # under the data dir
    image_dir: str | None        # image root under the data dir; None: the question file's own dir
    max_new_tokens: int          # §5.1: 128 in model_vqa_loader.py, 1024 in model_vqa*.py / science / mmbench
    pad_images: bool             # expand2square (process_images) or the processor alone (model_vqa, science)
    load: Callable               # (question_file, data_dir, annotation_file | None, image_root) -> (questions, gold)
    score: Callable              # (answers, questions, gold, out_dir, model_id) -> metrics; writes official files
    headline: str | None         # the metric in the results table (None: graded elsewhere)
    stop_strip: bool = False     # SQA and MMBench also strip a trailing stop string (§5.1)


def _image_question(rec, path, n, text_key="text", image_key="image"):
    need(rec, ["question_id", image_key, text_key], path, f"line {n}")
    text = rec[text_key]
    return Question(rec["question_id"], prompt=text, user=f"{IMAGE}\n{text}", image=rec[image_key])


def load_llava_jsonl(path, image_root=""):
    """LLaVA-1.5's eval.zip question files: JSON lines {question_id, image, text[, category]}; the prompt
    suffix is already in `text` (§5.1). Relative image paths are joined to image_root."""
    questions = [_image_question(rec, path, n) for n, rec in enumerate(read_jsonl(path), 1)]
    for q in questions:
        q.image = _join(image_root, q.image)
    return questions


def _join(root, rel):
    return rel if os.path.isabs(rel) else os.path.join(root, rel)

# -----------------------------------------------------------------------------
# EvalAI answer normalisation (§5.3; MMF's m4c_evaluator.EvalAIAnswerProcessor, and the official VQA
# evaluation's processPunctuation / processDigitArticle, which it copies)

# The official VQA table, 120 entries, quirks included: the capitalised keys ("Im", "Ive", "Id've", "I'dve")
# never match after lowercasing, and "somebody'd" maps to "somebodyd" (reversed).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The original writes "(?!<=\d)(\.)(?!\d)": "(?!<=" is a lookahead, not a lookbehind, and can never fail at a
# ".", so it removes every period not followed by a digit. It also passes re.UNICODE (= 32) as sub()'s
# positional `count`, so at most 32 periods go: we keep that cap because it changes scores on long answers.
PERIOD = re.compile(r"\.(?!\d)")
PERIOD_COUNT_QUIRK = 32


def process_punctuation(text: str) -> str:
    """Each of the 21 characters is deleted if the original text has it next to a space, or has a
    digit-comma-digit anywhere; otherwise it becomes a space. Then periods not followed by a digit go."""
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out, count=PERIOD_COUNT_QUIRK)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(answer: str) -> str:
    """EvalAIAnswerProcessor: lowercase, drop ',' and '?', split "'s", strip; newlines/tabs to spaces;
    punctuation; number words, articles, contractions. Since ',' is gone before process_punctuation, its
    digit-comma-digit rule never fires here (it does in vqaEval.py on the ground-truth side)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))

# -----------------------------------------------------------------------------
# VQA accuracy: VQAv2, VizWiz (the official vqaEval.py), TextVQA (m4c TextVQAAccuracyEvaluator)

def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """vqaEval.py, per question: the prediction gets punctuation + digit/article processing; the human
    answers get punctuation processing only, and only when they are not all identical (quirk: a ground
    truth "two" is never turned into "2", so it cannot match any processed prediction). Accuracy = mean
    over the annotators of min(1, matches among the other annotators / 3)."""
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    res = process_digit_article(process_punctuation(res))
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = [min(1.0, sum(g == res for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs) if accs else 0.0


def textvqa_answer_scores(gt_answers: list[str]) -> dict[str, float]:
    """m4c's _compute_answer_scores: every answer normalised (EvalAI); for each unique one, the mean over
    the 10 leave-one-out subsets of min(1, count in the subset / 3)."""
    answers = [evalai_normalize(a) for a in gt_answers]
    if len(answers) != 10:
        raise ValueError(f"TextVQA needs exactly 10 human answers, got {len(answers)}")
    scores = {}
    for a in set(answers):
        scores[a] = sum(min(1.0, sum(x == a for j, x in enumerate(answers) if j != i) / 3) for i in range(10)) / 10
    return scores


def textvqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    return textvqa_answer_scores(gt_answers).get(evalai_normalize(prediction), 0.0)


def textvqa_question(prompt: str) -> str:
    """eval_textvqa.py's prompt_processor: the question from the 2- or 3-line prompt (the OCR line may come
    first or second), or from the "OCR tokens: ... Question: ... Short answer:" form; lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise ValueError(f"TextVQA prompt in the OCR-tokens form without 'Question: ... Short answer:': {prompt!r}")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"TextVQA prompt in none of the known forms: {prompt!r}")
    return question.lower()

# -----------------------------------------------------------------------------
# Per-benchmark answer parsing

# eval_science_qa.py's --options default is a list, so membership is of a whole letter: "", "AB", "ABC" or "BC"
# are no letter (a string "ABCDE" would take them as substrings and score "" and "AB" as A).
SQA_OPTIONS = ("A", "B", "C", "D", "E")


def sqa_letter(text: str, options=SQA_OPTIONS) -> str:
    """eval_science_qa.py, in order (§5.2): the text is one of the letters; or "X. ..." (at least 3
    characters, so "A." alone fails); or exactly one match of r'The answer is ([A-Z]).'; else "FAILED".
    Where §5.2 is silent, as LLaVA-1.5's eval_science_qa.py (the one MoE-LLaVA copies) does it: the text is
    not stripped or lower-cased again (model_vqa_science.py strips it before writing), and the regex's '.' is
    unescaped, so it needs one more character of any kind ("The answer is B" at the very end fails)."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def sqa_index(letter: str, n_choices: int, options=SQA_OPTIONS) -> int:
    """get_pred_idx: the letter's index if it is one of the problem's first n_choices options, else -1, which
    never equals an answer (the original's random fallback after `return -1` is dead code)."""
    return options.index(letter) if letter in options[:n_choices] else -1


def pope_yes_no(text: str) -> str:
    """eval_pope.py: keep the text before the first '.', delete ',', split on single spaces; "No", "no" or
    "not" among the words means no, anything else yes (so "Not" capitalised is a yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def mme_yes_no(text: str) -> str:
    """MME eval_tool/calculation.py: lower-case; exactly yes/no, else "yes" then "no" searched in the first
    4 characters, else "other" (counted wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mmbench_letter(text: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's exact-matching extraction (can_infer): replace the characters .()[],:;!*#{} by spaces; if
    exactly one option letter is a word, that letter; else if exactly one option text (lower-cased) occurs in
    the answer, its letter; else None (wrong: the server would ask ChatGPT here)."""
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    hits = [c for c in options if c in words]
    if len(hits) == 1:
        return hits[0]
    hits = [c for c, o in options.items() if str(o).lower() in text.lower()]
    return hits[0] if len(hits) == 1 else None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA (pix2struct): numbers (a trailing '%' divides by 100) within 5% of a non-zero target; anything
    else, including a target of 0, must match exactly after lower-casing."""
    def to_float(text):
        try:
            return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None
    p, t = to_float(prediction), to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, gt_answers: list[str], tau: float = 0.5) -> float:
    """The RRC DocVQA script: the distance is between whitespace-collapsed, lower-cased strings, but the
    length it divides by is that of the raw strings (quirk kept); score = 1 - min NL, 0 if below tau."""
    det = " ".join(prediction.strip().lower().split())
    values = []
    for a in gt_answers:
        length = max(len(a), len(prediction))
        values.append(0.0 if length == 0 else levenshtein(" ".join(a.strip().lower().split()), det) / length)
    score = 1 - min(values) if values else 0.0
    return 0.0 if score < tau else score

# -----------------------------------------------------------------------------
# Writing official files

def write_json(path, obj, indent=None):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
    return path


def write_xlsx(path, header: list, rows: list[list]):
    """A one-sheet .xlsx (Office Open XML, inline strings) without pandas/openpyxl, for the MMBench upload."""
    def col(i):
        s = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            s = chr(65 + r) + s
        return s

    def cell(ref, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return f'<c r="{ref}"><v>{v}</v></c>'
        text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", "" if v is None else str(v))
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(text)}</t></is></c>'

    sheet_rows = "".join(f'<row r="{r + 1}">' + "".join(cell(f"{col(c)}{r + 1}", v) for c, v in enumerate(row))
                         + "</row>" for r, row in enumerate([header] + rows))
    ns = "http://schemas.openxmlformats.org"
    files = {
        "[Content_Types].xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Types xmlns="{ns}/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{ns}/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{ns}/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="{ns}/spreadsheetml/2006/main" '
            f'xmlns:r="{ns}/officeDocument/2006/relationships"><sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{ns}/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{ns}/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet xmlns="{ns}/spreadsheetml/2006/main">'
            f"<sheetData>{sheet_rows}</sheetData></worksheet>",
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _pct(num, den):
    return 100.0 * num / den if den else 0.0


def _answered(answers, questions):
    """Answers by question key, and how many of the questions were answered (for the metrics' 'n')."""
    by_key = {record_key(a): a for a in answers}
    return by_key, sum(q.key in by_key for q in questions)

# -----------------------------------------------------------------------------
# VQAv2 (test-dev submission; local accuracy given annotations) and VizWiz

def load_vqav2(qfile, data, ann, image_root):
    questions = load_llava_jsonl(qfile, image_root)
    full = os.path.join(os.path.dirname(qfile), "llava_vqav2_mscoco_test2015.jsonl")   # the upload covers all test
    test_split = [need(r, ["question_id"], full, f"line {n}")["question_id"]
                  for n, r in enumerate(read_jsonl(full), 1)] if os.path.isfile(full) else None
    gold = {"test_split": test_split, "annotations": None}
    ann = ann or os.path.join(data, "vqav2", "v2_mscoco_val2014_annotations.json")
    if os.path.isfile(ann):                  # official VQA format: {"annotations": [{question_id, answers, ...}]}
        anns = read_json(ann)
        anns = anns.get("annotations") if isinstance(anns, dict) else None
        if not isinstance(anns, list):
            raise DataFileError(f"{ann}: expected {{'annotations': [...]}} (v2_mscoco_val2014_annotations.json)")
        gold["annotations"] = {str(need(a, ["question_id", "answers"], ann, f"annotation #{i}")["question_id"]): a
                               for i, a in enumerate(anns)}
    return questions, gold


def score_vqav2(answers, questions, gold, out_dir, model_id):
    """convert_vqav2_for_submission.py: EvalAI-normalised answers over the whole test2015 list ("" for ids
    not answered); VQA accuracy (vqaEval.py) on the normalised answers when annotations are given."""
    texts = {str(a["question_id"]): a["text"] for a in answers}
    ids = gold["test_split"] if gold["test_split"] is not None else [q.question_id for q in questions]
    upload = [{"question_id": i, "answer": evalai_normalize(texts[str(i)]) if str(i) in texts else ""} for i in ids]
    m = {"n": len(answers), "n_questions": len(questions),
         "submission": write_json(os.path.join(out_dir, "upload", "vqav2", f"{model_id}.json"), upload)}
    if gold["annotations"] is not None:
        m.update(_vqa_local([(gold["annotations"].get(str(a["question_id"])), a["text"]) for a in answers]))
    return m


def _vqa_local(pairs):
    """VQA accuracy over (annotation, prediction) pairs that have an annotation, overall and per answer_type."""
    per_type, scores = defaultdict(list), []
    for ann, text in pairs:
        if ann is None:
            continue
        s = vqa_accuracy(evalai_normalize(text), [x["answer"] for x in ann["answers"]])
        scores.append(s)
        per_type[ann.get("answer_type", "all")].append(s)
    return {"accuracy": _pct(sum(scores), len(scores)), "n_scored": len(scores),
            "per_answer_type": {k: _pct(sum(v), len(v)) for k, v in sorted(per_type.items())}}


def load_vizwiz(qfile, data, ann, image_root):
    questions = load_llava_jsonl(qfile)
    images = [q.image for q in questions]                # the submission names images as the file does
    for q in questions:
        q.image = _join(image_root, q.image)
    gold = {"images": images, "annotations": None}
    ann = ann or os.path.join(data, "vizwiz", "val.json")
    if os.path.isfile(ann):                  # official VizWiz: [{image, question, answers, answer_type, answerable}]
        anns = read_json(ann)
        if not isinstance(anns, list):
            raise DataFileError(f"{ann}: expected a JSON list of VizWiz annotations")
        gold["annotations"] = {need(a, ["image", "answers"], ann, f"annotation #{i}")["image"]: a
                               for i, a in enumerate(anns)}
    return questions, gold


def score_vizwiz(answers, questions, gold, out_dir, model_id):
    """convert_vizwiz_for_submission.py: [{image, answer}] with EvalAI normalisation, in question order
    (the original asserts every question is answered; a missing one is written as ""). With val
    annotations: VQA accuracy, 'unanswerable' being one more answer, per answer_type."""
    by_key, _ = _answered(answers, questions)
    upload, pairs = [], []
    for q, image in zip(questions, gold["images"]):
        a = by_key.get(q.key)
        upload.append({"image": image, "answer": evalai_normalize(a["text"]) if a else ""})
        if a is not None and gold["annotations"] is not None:
            pairs.append((gold["annotations"].get(image), a["text"]))
    m = {"n": len(answers), "n_questions": len(questions),
         "submission": write_json(os.path.join(out_dir, "upload", "vizwiz", f"{model_id}.json"), upload)}
    if gold["annotations"] is not None:
        m.update(_vqa_local(pairs))
    return m

# -----------------------------------------------------------------------------
# GQA

# The official layout first: LLaVA's docs put GQA's download under gqa/data, and MoE-LLaVA's gqa.sh reads the
# questions from gqa/data/questions1.2/; the flat one is where our synthetic set (data.py) writes them.
GQA_ANNOTATIONS = (os.path.join("gqa", "data", "questions1.2", "testdev_balanced_questions.json"),
                   os.path.join("gqa", "testdev_balanced_questions.json"))


def load_gqa(qfile, data, ann, image_root):
    questions = load_llava_jsonl(qfile, image_root)
    if ann is None:
        candidates = [os.path.join(data, p) for p in GQA_ANNOTATIONS]
        ann = next((p for p in candidates if os.path.isfile(p)), None)
        if ann is None:
            raise DataFileError(f"GQA annotations: none of {candidates} exists (--annotations gqa=FILE names another)")
    gold = read_json(ann)
    if not isinstance(gold, dict):
        raise DataFileError(f"{ann}: expected {{question_id: {{question, answer, isBalanced, ...}}}}")
    for qid, g in gold.items():
        need(g, ["answer"], ann, f"question {qid}")
    return questions, gold


def score_gqa(answers, questions, gold, out_dir, model_id):
    """convert_gqa_for_eval.py: prediction = text.rstrip('.').lower(); then GQA's eval.py: over balanced
    questions, correct iff prediction == gold answer exactly (no article or plural handling); open vs
    binary by the structural type ('query' is open)."""
    preds = [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers]
    path = write_json(os.path.join(out_dir, "upload", "gqa", "testdev_balanced_predictions.json"), preds)
    scores, by_type = [], defaultdict(list)
    for p in preds:
        g = gold.get(str(p["questionId"]))
        if g is None:
            raise DataFileError(f"GQA answer for question {p['questionId']!r} has no entry in the annotations")
        if not g.get("isBalanced", True):
            continue
        s = float(p["prediction"] == g["answer"])
        scores.append(s)
        types = g.get("types", {})
        if "structural" in types:
            by_type["open" if types["structural"] == "query" else "binary"].append(s)
        for kind in ("structural", "semantic", "detailed"):
            if kind in types:
                by_type[f"{kind}/{types[kind]}"].append(s)
    return {"accuracy": _pct(sum(scores), len(scores)), "n": len(scores), "n_questions": len(questions),
            "per_type": {k: _pct(sum(v), len(v)) for k, v in sorted(by_type.items())}, "predictions": path}

# -----------------------------------------------------------------------------
# ScienceQA-IMG

def load_scienceqa(qfile, data, ann, image_root):
    """model_vqa_science.py: the human turn without "<image>", stripped; "<image>\\n" put back in front when the
    problem has an image; the letter prompt appended (--single-pred-prompt). Images are not padded."""
    recs = read_json(qfile)
    if not isinstance(recs, list):
        raise DataFileError(f"{qfile}: expected a JSON list of LLaVA conversations")
    questions = []
    for n, rec in enumerate(recs):
        need(rec, ["id", "conversations"], qfile, f"record #{n}")
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
            raise DataFileError(f"{qfile}: record #{n} (id={rec['id']}) has no human turn")
        qs = turns[0]["value"].replace(IMAGE, "").strip()
        head = f"{IMAGE}\n" if "image" in rec else ""
        questions.append(Question(rec["id"], prompt=head + qs + LETTER, user=head + qs + LETTER,
                                  image=_join(image_root, rec["image"]) if "image" in rec else None))
    root = os.path.dirname(qfile)
    problems = read_json(os.path.join(root, "problems.json"))
    splits = read_json(os.path.join(root, "pid_splits.json"))
    if not isinstance(splits, dict) or "test" not in splits:
        raise DataFileError(f"{os.path.join(root, 'pid_splits.json')}: lacks the 'test' split")
    for pid in splits["test"]:
        need(problems.get(pid), ["choices", "answer"], os.path.join(root, "problems.json"), f"problem {pid}")
    return questions, {"problems": problems, "test": [str(p) for p in splits["test"]]}


def score_scienceqa(answers, questions, gold, out_dir, model_id):
    """eval_science_qa.py: a problem is right iff its parsed letter is one of its choices and equals the
    answer. A problem without an answer is scored as the original scores a test problem missing from the
    answer file: text "FAILED", prompt "Unknown", so it is wrong and lowers the accuracy; and since a problem
    counts for SQA-IMG iff its answer's prompt holds "<image>", it is outside IMG accuracy, there as here
    (n_img_unanswered says how many image problems that left out). The original scores the whole test split;
    we score the test problems that were asked (--max-samples), which is the same for a complete run."""
    preds = {str(a["question_id"]): a for a in answers}
    asked = {str(q.question_id): q for q in questions}
    results, outputs, right, img_right, img_total, img_unanswered = {}, {}, 0, 0, 0, 0
    for pid in gold["test"]:
        if pid not in asked:
            continue
        prob, pred = gold["problems"][pid], preds.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        idx = sqa_index(sqa_letter(pred["text"]), len(prob["choices"]))
        results[pid], outputs[pid] = idx, pred["text"]
        ok = idx == prob["answer"]
        right += ok
        if IMAGE in pred["prompt"]:
            img_right, img_total = img_right + ok, img_total + 1
        elif pid not in preds and IMAGE in asked[pid].prompt:
            img_unanswered += 1
    n = len(results)
    path = write_json(os.path.join(out_dir, "upload", "scienceqa", f"{model_id}_result.json"),
                      {"acc": _pct(right, n), "correct": right, "count": n, "results": results, "outputs": outputs}, indent=2)
    return {"img_accuracy": _pct(img_right, img_total), "accuracy": _pct(right, n),
            "n": sum(pid in preds for pid in results), "n_scored": n, "n_img": img_total,
            "n_img_unanswered": img_unanswered, "n_questions": len(questions), "results": path}

# -----------------------------------------------------------------------------
# TextVQA

def load_textvqa(qfile, data, ann, image_root):
    questions = load_llava_jsonl(qfile, image_root)
    ann = ann or os.path.join(data, "textvqa", "TextVQA_0.5.1_val.json")
    recs = read_json(ann)
    if not isinstance(recs, dict) or not isinstance(recs.get("data"), list):
        raise DataFileError(f"{ann}: expected {{'data': [...]}} (TextVQA_0.5.1_val.json)")
    by_image, by_qid = {}, {}
    for i, r in enumerate(recs["data"]):
        need(r, ["image_id", "question", "answers"], ann, f"data[{i}]")
        by_image[(str(r["image_id"]), r["question"].lower())] = r
        if "question_id" in r:
            by_qid[(str(r["question_id"]), r["question"].lower())] = r
    gold = {"by_image": by_image, "by_qid": by_qid}
    for q in questions:                                # fail now, not after generation, on an unmatched question
        textvqa_annotation(gold, q.question_id, q.prompt, ann)
    return questions, gold


def textvqa_annotation(gold, question_id, prompt, ann="the annotations"):
    try:
        key = (str(question_id), textvqa_question(prompt))
    except ValueError as e:
        raise DataFileError(f"TextVQA question {question_id!r}: {e}") from None
    g = gold["by_image"].get(key) or gold["by_qid"].get(key)
    if g is None:
        raise DataFileError(f"TextVQA question {key} matches no entry of {ann} by (image_id, question) or "
                            "(question_id, question)")
    return g


def score_textvqa(answers, questions, gold, out_dir, model_id):
    """eval_textvqa.py: annotation = by (answer's question_id, question recovered from the prompt) against
    (image_id, question) (LLaVA's file stores the image id as question_id); soft accuracy x 100."""
    scores = [textvqa_accuracy(a["text"], textvqa_annotation(gold, a["question_id"], a["prompt"])["answers"])
              for a in answers]
    return {"accuracy": _pct(sum(scores), len(scores)), "n": len(scores), "n_questions": len(questions)}

# -----------------------------------------------------------------------------
# POPE

POPE_CATEGORIES = ("adversarial", "popular", "random")
# LLaVA's docs/Evaluation.md links POPE's output/coco at this commit; the label files POPE serves today are
# another version (3000 "random" questions, not the 2910 of llava_pope_test.jsonl; issue 14) in another order.
POPE_LABEL_VERSION = ("the label files of POPE commit e3e39262c85a6a83f26cf5094022a782cb0df58d (output/coco), "
                      "which LLaVA's docs/Evaluation.md pins")


def _pope_text(text):
    """A POPE question as its label file writes it: LLaVA's question file adds the single-word suffix."""
    return (text[:-len(SHORT)] if text.endswith(SHORT) else text).strip()


def load_pope(qfile, data, ann, image_root):
    """Questions and, per category, the labels in order. eval_pope.py pairs a category's answers with its label
    file by position alone, so a label file of another version gives a wrong F1 without a word; here each
    label's image and question must be those of the question at its position, or loading fails."""
    questions, recs = load_llava_jsonl(qfile, image_root), read_jsonl(qfile)
    cats = [need(rec, ["category"], qfile, f"question {q.question_id}")["category"] for q, rec in zip(questions, recs)]
    labels = {}
    root = ann or os.path.dirname(qfile)
    for cat in sorted(set(cats)):
        # MoE-LLaVA reads pope/coco/coco_pope_{category}.json; the file sits in pope/ in some layouts
        candidates = [os.path.join(root, "coco", f"coco_pope_{cat}.json"), os.path.join(root, f"coco_pope_{cat}.json")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise DataFileError(f"POPE labels for category {cat!r}: none of {candidates} exists")
        items = [need(x, ["label", "image", "text"], path, f"line {n}") for n, x in enumerate(read_lines_or_json(path), 1)]
        asked = [rec for rec, c in zip(recs, cats) if c == cat]
        if len(items) < len(asked):
            raise DataFileError(f"{path}: {len(items)} labels for {len(asked)} {cat} questions; use {POPE_LABEL_VERSION}")
        for pos, (rec, x) in enumerate(zip(asked, items), 1):
            if (os.path.basename(str(x["image"])), _pope_text(str(x["text"]))) != \
                    (os.path.basename(str(rec["image"])), _pope_text(str(rec["text"]))):
                raise DataFileError(
                    f"{path}: label {pos} ({x['image']!r}, {_pope_text(str(x['text']))!r}) does not match {cat} question "
                    f"{rec['question_id']!r} (#{pos} of its category in {qfile}: {rec['image']!r}, "
                    f"{_pope_text(str(rec['text']))!r}); these labels are another version, use {POPE_LABEL_VERSION}")
        labels[cat] = [x["label"] for x in items]
    return questions, {"categories": cats, "labels": labels}


def pope_metrics(preds: list[str], labels: list[str]) -> dict:
    """eval_pope.py on parsed answers (yes is positive). Precision/recall/F1 are 0 when undefined."""
    tp = sum(p == "yes" and g != "no" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g != "no" for p, g in zip(preds, labels))
    precision, recall = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": _pct(tp + tn, tp + tn + fp + fn),
            "precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "yes_ratio": _pct(sum(p == "yes" for p in preds), len(preds)), "n": len(preds)}


def score_pope(answers, questions, gold, out_dir, model_id):
    """Per category, each answer against the label at its position within the category (the original zips
    the category's answers with the label file in order). Headline = mean F1 over the categories (§5.2)."""
    by_key, _ = _answered(answers, questions)
    preds, labels, seen = defaultdict(list), defaultdict(list), Counter()
    for q, cat in zip(questions, gold["categories"]):
        pos = seen[cat]
        seen[cat] += 1
        if q.key in by_key:
            preds[cat].append(pope_yes_no(by_key[q.key]["text"]))
            labels[cat].append(gold["labels"][cat][pos])
    per_cat = {c: pope_metrics(preds[c], labels[c]) for c in sorted(preds)}
    mean = lambda k: sum(m[k] for m in per_cat.values()) / len(per_cat) if per_cat else 0.0  # noqa: E731
    return {"f1_mean": mean("f1"), "accuracy_mean": mean("accuracy"), "yes_ratio_mean": mean("yes_ratio"),
            "n": sum(len(v) for v in preds.values()), "n_questions": len(questions), "categories": per_cat}

# -----------------------------------------------------------------------------
# MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def read_mme_gt(root):
    """convert_answer_to_mme.py's get_gt: {(category, txt file, question): answer} from the release dir,
    whose categories keep their txt files either in questions_answers_YN/ or next to the images."""
    if not os.path.isdir(root):
        raise DataFileError(f"{root}: not found (MME_Benchmark_release_version holds the ground truth)")
    gt = {}
    for category in sorted(os.listdir(root)):
        cdir = os.path.join(root, category)
        if not os.path.isdir(cdir):
            continue
        qa = os.path.join(cdir, "questions_answers_YN") if os.path.isdir(os.path.join(cdir, "images")) else cdir
        for file in sorted(os.listdir(qa)):
            if not file.endswith(".txt"):
                continue
            with open(os.path.join(qa, file), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2:
                        raise DataFileError(f"{os.path.join(qa, file)}:{n}: expected 'question<TAB>answer'")
                    gt[(category, file, parts[0])] = parts[1]
    return gt


def mme_key(question_id: str, prompt: str, gt: dict):
    """convert_answer_to_mme.py: category and txt file from question_id ("category/image.ext"), the question
    from the prompt without the single-word suffix; "Please answer yes or no." appended if absent, with two
    spaces when one space is not in the ground truth."""
    category, file = question_id.split("/")[0], question_id.split("/")[-1].split(".")[0] + ".txt"
    q = prompt.replace(SHORT.strip(), "").strip()
    if "Please answer yes or no." not in q:
        q = q + " Please answer yes or no."
        if (category, file, q) not in gt:
            q = q.replace(" Please answer yes or no.", "  Please answer yes or no.")
    return category, file, q


def load_mme(qfile, data, ann, image_root):
    questions = load_llava_jsonl(qfile, image_root)
    gt = read_mme_gt(ann or os.path.join(os.path.dirname(qfile), "MME_Benchmark_release_version"))
    for q in questions:
        if mme_key(str(q.question_id), q.prompt, gt) not in gt:
            raise DataFileError(f"MME question {q.question_id!r} ({q.prompt[:60]!r}) has no ground truth")
    return questions, gt


def score_mme(answers, questions, gt, out_dir, model_id):
    """MME's calculation.py per subtask: acc over questions, acc+ over images with every question right,
    score = 100 acc + 100 acc+; perception (10 subtasks, max 2000) and cognition (4, max 800) sums. Also
    writes the per-subtask txt files (image, question, gt, prediction) that calculation.py reads."""
    rows = defaultdict(list)
    for a in answers:
        category, file, q = mme_key(str(a["question_id"]), a["prompt"], gt)
        image = str(a["question_id"]).split("/")[-1]
        rows[category].append((image, q, gt[(category, file, q)], a["text"]))
    subtasks = {}
    for category, items in sorted(rows.items()):
        with open(_mkdir(os.path.join(out_dir, "upload", "mme", model_id, f"{category}.txt")), "w", encoding="utf-8") as f:
            f.writelines("\t".join([im, q, g, re.sub(r"[\t\n]", " ", p)]) + "\n" for im, q, g, p in items)
        per_image = defaultdict(list)
        for im, _, g, p in items:
            per_image[im].append(mme_yes_no(p) == g.lower())
        right = sum(ok for v in per_image.values() for ok in v)
        acc, acc_plus = _pct(right, len(items)), _pct(sum(all(v) for v in per_image.values()), len(per_image))
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(items),
                              "other": sum(mme_yes_no(p) == "other" for *_, p in items)}
    total = lambda names: sum(subtasks[c]["score"] for c in names if c in subtasks)  # noqa: E731
    return {"perception": total(MME_PERCEPTION), "cognition": total(MME_COGNITION), "n": len(answers),
            "n_questions": len(questions), "missing_subtasks": [c for c in MME_PERCEPTION + MME_COGNITION if c not in subtasks],
            "subtasks": subtasks, "results_dir": os.path.join(out_dir, "upload", "mme", model_id)}


def _mkdir(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

# -----------------------------------------------------------------------------
# MMBench

MMBENCH_OPTIONS = ("A", "B", "C", "D")
# pandas.read_table's default NA strings: the original's is_none() sees these cells as NaN, so an option
# spelled "NA" or "None" ends the option list there, as it does here.
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _is_none(v):
    """model_vqa_mmbench.py's is_none, on cells read as pandas would read them."""
    return v is None or v in PANDAS_NA or v.lower() in ("nan", "none")


def read_tsv(path):
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: not found")
    csv.field_size_limit(1 << 30)                                     # base64 images are long cells
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise DataFileError(f"{path}: empty")
    header = rows[0]
    for n, r in enumerate(rows[1:], 2):
        if len(r) != len(header):
            raise DataFileError(f"{path}:{n}: {len(r)} cells, header has {len(header)}")
    return header, [dict(zip(header, r)) for r in rows[1:]]


def load_mmbench(qfile, data, ann, image_root):
    """model_vqa_mmbench.py, one round per row (MoE-LLaVA does not pass --all-rounds): [hint + "\\n"] +
    question + "\\n{L}. {option}" per present option; prompt = that; the user turn adds "<image>\\n" in front
    and the letter instruction (Chinese for the CN set) after. Images are base64 cells of the TSV."""
    header, rows = read_tsv(qfile)
    missing = [c for c in ("index", "question", "image", "A", "B") if c not in header]
    if missing:
        raise DataFileError(f"{qfile}: lacks the MMBench columns {missing}")
    images = {r["index"]: r["image"] for r in rows}
    cn = "_cn" in os.path.basename(qfile).lower()
    questions = []
    for n, r in enumerate(rows, 2):
        if not r["index"].lstrip("-").isdigit():
            raise DataFileError(f"{qfile}:{n}: index {r['index'][:20]!r} is not an integer")
        options = []
        for c in MMBENCH_OPTIONS:
            if c not in r or _is_none(r[c]):
                break
            options.append(r[c])
        text = r["question"] if _is_none(r.get("hint")) else r["hint"] + "\n" + r["question"]
        text += "".join(f"\n{c}. {o}" for c, o in zip(MMBENCH_OPTIONS, options))
        image = r["image"]
        if len(image) < 64 and image in images:                       # later TSVs point duplicates at a row
            image = images[image]
        try:
            raw = base64.b64decode(image, validate=True)
        except ValueError:
            raise DataFileError(f"{qfile}: row index={r['index']}: the image cell is not base64") from None
        questions.append(Question(int(r["index"]), prompt=text, user=f"{IMAGE}\n{text}" + (LETTER_CN if cn else LETTER),
                                  image=raw, extra={"round_id": 0, "options": options,
                                                    "option_char": list(MMBENCH_OPTIONS[:len(options)])}))
    has_answers = "answer" in header and all(not _is_none(r["answer"]) for r in rows)
    return questions, {"header": header, "rows": rows, "answers": has_answers}


def score_mmbench(answers, questions, gold, out_dir, model_id):
    """convert_mmbench_for_submission.py: the TSV without hint/category/source/image/comment/l2-category, a
    'prediction' column inserted at position 6, as xlsx (+ the same as TSV). With answers (dev): circular
    evaluation, CircularEval as OpenCompass runs it: rows whose index differs by multiples of 1e6 are the
    option-shifted copies of one question, which scores only if every copy is right."""
    preds = {int(a["question_id"]): a["text"] for a in answers}
    drop = {"hint", "category", "source", "image", "comment", "l2-category"}
    cols = [c for c in gold["header"] if c not in drop]
    cols.insert(min(6, len(cols)), "prediction")
    table = [[preds.get(int(r["index"])) if c == "prediction" else r[c] for c in cols] for r in gold["rows"]]
    table = [[int(v) if c == "index" else v for c, v in zip(cols, row)] for row in table]
    base = os.path.join(out_dir, "upload", "mmbench", model_id)
    write_xlsx(base + ".xlsx", cols, table)
    with open(base + ".tsv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([cols] + [["" if v is None else v for v in row] for row in table])
    m = {"n": len(answers), "n_questions": len(questions), "submission": base + ".xlsx"}
    if not gold["answers"]:
        return m
    hits, groups = {}, defaultdict(list)
    for r in gold["rows"]:
        idx = int(r["index"])
        if idx not in preds:
            continue
        options = {c: r[c] for c in MMBENCH_OPTIONS if c in r and not _is_none(r[c])}
        hits[idx] = mmbench_letter(preds[idx], options) == r["answer"]
        groups[idx % 1_000_000].append((idx, r.get("category", "")))
    circular = {g: all(hits[i] for i, _ in rows) for g, rows in groups.items()
                if any(i == g for i, _ in rows)}                      # a group is scored when its main row was asked
    per_cat = defaultdict(list)
    for g, ok in circular.items():
        per_cat[next(c for i, c in groups[g] if i == g)].append(ok)
    main = [hits[g] for g in circular]
    return m | {"circular_accuracy": _pct(sum(circular.values()), len(circular)), "n_circular": len(circular),
                "vanilla_accuracy": _pct(sum(main), len(main)),
                "per_category": {c: _pct(sum(v), len(v)) for c, v in sorted(per_cat.items())}}

# -----------------------------------------------------------------------------
# MM-Vet, LLaVA-Bench (graded by GPT elsewhere), ChartQA, DocVQA

def score_mmvet(answers, questions, gold, out_dir, model_id):
    """convert_mmvet_for_eval.py: {"v1_{question_id}": answer} for the official GPT-4 grader."""
    path = write_json(os.path.join(out_dir, "upload", "mm-vet", f"{model_id}.json"),
                      {f"v1_{a['question_id']}": a["text"] for a in answers}, indent=2)
    return {"n": len(answers), "n_questions": len(questions), "grader_input": path}


def score_llavabench(answers, questions, gold, out_dir, model_id):
    """eval_gpt_review_bench.py reads the answers JSONL itself; a copy goes next to the other uploads."""
    path = _mkdir(os.path.join(out_dir, "upload", "llava-bench-in-the-wild", f"{model_id}.jsonl"))
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    return {"n": len(answers), "n_questions": len(questions), "judge_input": path}


def load_with_images(qfile, data, ann, image_root):
    return load_llava_jsonl(qfile, image_root), None


def load_chartqa(qfile, data, ann, image_root):
    """ChartQA's own test files [{imgname, query, label}] (human and augmented splits, next to each other);
    the LLaVA-1.5 short-answer suffix is appended as for the other short-answer sets."""
    root, questions, labels = os.path.dirname(qfile), [], {}
    paths = [p for p in (os.path.join(root, "test_human.json"), os.path.join(root, "test_augmented.json"))
             if os.path.isfile(p)] or [qfile]
    for path in paths:
        split = "human" if "human" in os.path.basename(path) else "augmented"
        recs = read_json(path)
        if not isinstance(recs, list):
            raise DataFileError(f"{path}: expected a JSON list of {{imgname, query, label}}")
        for i, r in enumerate(recs):
            need(r, ["imgname", "query", "label"], path, f"record #{i}")
            qid = f"{split}_{i}"
            questions.append(Question(qid, prompt=r["query"] + SHORT, user=f"{IMAGE}\n{r['query']}{SHORT}",
                                      image=_join(image_root, r["imgname"])))
            labels[qid] = r["label"]
    return questions, labels


def score_chartqa(answers, questions, labels, out_dir, model_id):
    """Relaxed accuracy per split and their mean (the number ChartQA results usually quote)."""
    per_split = defaultdict(list)
    for a in answers:
        gold = labels[a["question_id"]]
        golds = gold if isinstance(gold, list) else [gold]
        per_split[a["question_id"].split("_")[0]].append(max(relaxed_correctness(str(g), a["text"].strip()) for g in golds))
    accs = {s: _pct(sum(v), len(v)) for s, v in sorted(per_split.items())}
    return {"relaxed_accuracy": sum(accs.values()) / len(accs) if accs else 0.0, "per_split": accs,
            "n": len(answers), "n_questions": len(questions)}


def load_docvqa(qfile, data, ann, image_root):
    """DocVQA's own {"data": [{questionId, question, image, answers?}]}; images relative to the file's dir."""
    recs = read_json(qfile)
    if not isinstance(recs, dict) or not isinstance(recs.get("data"), list):
        raise DataFileError(f"{qfile}: expected {{'data': [...]}} (val_v1.0.json / test_v1.0.json)")
    questions, answers = [], {}
    for i, r in enumerate(recs["data"]):
        need(r, ["questionId", "question", "image"], qfile, f"data[{i}]")
        questions.append(Question(r["questionId"], prompt=r["question"] + SHORT, user=f"{IMAGE}\n{r['question']}{SHORT}",
                                  image=_join(image_root, r["image"])))
        if "answers" in r:
            answers[str(r["questionId"])] = r["answers"]
    return questions, answers


def score_docvqa(answers, questions, gold, out_dir, model_id):
    """The RRC submission [{questionId, answer}]; ANLS (tau 0.5) when the file has answers (val)."""
    path = write_json(os.path.join(out_dir, "upload", "docvqa", f"{model_id}.json"),
                      [{"questionId": a["question_id"], "answer": a["text"]} for a in answers])
    m = {"n": len(answers), "n_questions": len(questions), "submission": path}
    scored = [anls(a["text"], gold[str(a["question_id"])]) for a in answers if str(a["question_id"]) in gold]
    if scored:
        m |= {"anls": 100 * sum(scored) / len(scored), "n_scored": len(scored)}
    return m

# -----------------------------------------------------------------------------
# The registry, in the order of MoE-LLaVA's main table (§6.1), then the document sets

BENCHMARKS = {b.name: b for b in [
    Benchmark("vqav2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015", 128, True,
              load_vqav2, score_vqav2, "accuracy"),
    Benchmark("gqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images", 128, True,
              load_gqa, score_gqa, "accuracy"),
    Benchmark("vizwiz", "vizwiz/llava_test.jsonl", "vizwiz/test", 128, True, load_vizwiz, score_vizwiz, "accuracy"),
    Benchmark("scienceqa", "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test", 1024, False,
              load_scienceqa, score_scienceqa, "img_accuracy", stop_strip=True),
    Benchmark("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images", 128, True,
              load_textvqa, score_textvqa, "accuracy"),
    Benchmark("pope", "pope/llava_pope_test.jsonl", "pope/val2014", 128, True, load_pope, score_pope, "f1_mean"),
    Benchmark("mme", "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version", 128, True,
              load_mme, score_mme, "perception"),
    Benchmark("mmbench", "mmbench/mmbench_dev_20230712.tsv", None, 1024, True, load_mmbench, score_mmbench,
              "circular_accuracy", stop_strip=True),
    Benchmark("llavabench", "llava-bench-in-the-wild/questions.jsonl", "llava-bench-in-the-wild/images", 1024, False,
              load_with_images, score_llavabench, None),
    Benchmark("mmvet", "mm-vet/llava-mm-vet.jsonl", "mm-vet/images", 1024, False, load_with_images, score_mmvet, None),
    Benchmark("chartqa", "chartqa/test/test_human.json", "chartqa/test/png", 128, True,
              load_chartqa, score_chartqa, "relaxed_accuracy"),
    Benchmark("docvqa", "docvqa/val/val_v1.0.json", None, 128, True, load_docvqa, score_docvqa, "anls"),
]}
