"""Benchmark prompts: the datasets shipped with specdec, or any JSONL file of the same shape.

A question is ``{"question_id": int | str, "category": str, "turns": [str, ...]}``; a
multi-turn question is run turn by turn with the model's own previous answer in the
history (as Spec-Bench does). Built-in datasets (files under ``datasets/``, licences
beside them, provenance in ``datasets/SOURCES.md``):

- ``spec-bench`` — Spec-Bench's 480 questions in six categories: ``mt_bench`` (80 two-turn
  MT-bench questions; their own category, e.g. ``writing``, is kept as ``subcategory``),
  ``translation``, ``summarization``, ``qa``, ``math_reasoning``, ``rag``;
- ``humaneval`` — the 164 HumanEval problems, category ``code``: the function stub after a
  one-line instruction to complete it;
- ``gsm8k`` — the 1,319 GSM8K test questions, category ``math``;
- ``mixed`` — a fixed small set: 8 each of ``code`` (HumanEval 0-7), ``chat`` (one MT-bench
  question per MT-bench category), ``summarization`` (Spec-Bench's first 8) and ``math``
  (GSM8K test 0-7).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from specdec.errors import InvalidRequestError

MT_BENCH_CATEGORIES = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
MIXED_PER_CATEGORY = 8


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    subcategory: str | None = None


@dataclass
class Dataset:
    name: str
    questions: list[Question]
    files: list[dict[str, Any]] = field(default_factory=list)  # path, sha256 of what was read

    @property
    def categories(self) -> list[str]:
        """Categories in order of first appearance."""
        return list(dict.fromkeys(q.category for q in self.questions))

    def select(
        self, categories: list[str] | None = None, limit: int | None = None, skip: int = 0
    ) -> Dataset:
        """The questions of the given categories (a subcategory name matches too): of each
        category, ``limit`` questions (all if None) after its first ``skip``."""
        questions = self.questions
        if categories:
            known = set(self.categories) | {q.subcategory for q in questions if q.subcategory}
            unknown = [c for c in categories if c not in known]
            if unknown:
                raise InvalidRequestError(
                    f"dataset {self.name} has no category {unknown[0]!r} "
                    f"(its categories: {', '.join(self.categories)})"
                )
            wanted = set(categories)
            questions = [q for q in questions if q.category in wanted or q.subcategory in wanted]
        if limit is not None and limit < 1:
            raise InvalidRequestError(f"--limit must be >= 1, got {limit}")
        if limit is not None or skip:
            seen: dict[str, int] = {}
            kept = []
            for q in questions:
                n = seen[q.category] = seen.get(q.category, 0) + 1
                if n > skip and (limit is None or n <= skip + limit):
                    kept.append(q)
            questions = kept
        return Dataset(self.name, questions, self.files)


def _data_file(*parts: str) -> Path:
    return Path(str(resources.files("specdec.bench").joinpath("datasets", *parts)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": _sha256(path), "bytes": path.stat().st_size}


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a one-line error for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidRequestError(f"cannot read dataset {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"dataset {path} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InvalidRequestError(f"{path} line {n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise InvalidRequestError(f"{path} line {n}: expected a JSON object")
        out.append((n, obj))
    return out


def _question(path: Path, n: int, obj: dict[str, Any]) -> Question:
    where = f"{path} line {n}"
    qid = obj.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise InvalidRequestError(f"{where}: question_id must be a number or a string")
    category = obj.get("category")
    if not isinstance(category, str) or not category:
        raise InvalidRequestError(f"{where}: category must be a non-empty string")
    turns = obj.get("turns")
    if (
        not isinstance(turns, list)
        or not turns
        or not all(isinstance(t, str) and t.strip() for t in turns)
    ):
        raise InvalidRequestError(f"{where}: turns must be a non-empty list of non-empty strings")
    return Question(qid, category, tuple(turns))


def load_jsonl(path: str | Path, name: str | None = None) -> Dataset:
    """Questions from a JSONL file: ``question_id``, ``category``, ``turns`` on every line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"no such dataset file: {path}")
    questions = [_question(path, n, obj) for n, obj in _read_jsonl(path)]
    if not questions:
        raise InvalidRequestError(f"dataset {path} holds no questions")
    seen: set[int | str] = set()
    for q in questions:
        if q.question_id in seen:
            raise InvalidRequestError(f"dataset {path}: question_id {q.question_id!r} repeats")
        seen.add(q.question_id)
    return Dataset(name or str(path), questions, [_file_record(path)])


def spec_bench() -> Dataset:
    ds = load_jsonl(_data_file("spec_bench", "question.jsonl"), "spec-bench")
    questions = [
        Question(q.question_id, "mt_bench", q.turns, q.category)
        if q.category in MT_BENCH_CATEGORIES
        else q
        for q in ds.questions
    ]
    return Dataset("spec-bench", questions, ds.files)


def humaneval() -> Dataset:
    path = _data_file("humaneval", "HumanEval.jsonl")
    questions = [
        Question(obj["task_id"], "code", (HUMANEVAL_INSTRUCTION.format(prompt=obj["prompt"]),))
        for _, obj in _read_jsonl(path)
    ]
    return Dataset("humaneval", questions, [_file_record(path)])


def gsm8k() -> Dataset:
    path = _data_file("gsm8k", "test.jsonl")
    questions = [
        Question(f"gsm8k/{i}", "math", (obj["question"],))
        for i, (_, obj) in enumerate(_read_jsonl(path))
    ]
    return Dataset("gsm8k", questions, [_file_record(path)])


def mixed() -> Dataset:
    k = MIXED_PER_CATEGORY
    sb, he, gs = spec_bench(), humaneval(), gsm8k()
    chat = []
    for sub in MT_BENCH_CATEGORIES:  # the first question of each MT-bench category
        q = next(q for q in sb.questions if q.subcategory == sub)
        chat.append(Question(q.question_id, "chat", q.turns, sub))
    summaries = [q for q in sb.questions if q.category == "summarization"][:k]
    questions = he.questions[:k] + chat[:k] + summaries + gs.questions[:k]
    return Dataset("mixed", questions, sb.files + he.files + gs.files)


BUILTIN = {"spec-bench": spec_bench, "humaneval": humaneval, "gsm8k": gsm8k, "mixed": mixed}


def load_dataset(spec: str) -> Dataset:
    """A built-in dataset by name, or a JSONL file by path."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec).expanduser()
    if path.exists() or "/" in spec or spec.endswith((".jsonl", ".json")):
        return load_jsonl(path)
    raise InvalidRequestError(
        f"unknown dataset {spec!r} (built-in: {', '.join(BUILTIN)}; or a JSONL file)"
    )
