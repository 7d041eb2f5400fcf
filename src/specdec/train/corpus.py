"""What a head is trained on, without a hub: the shipped prompt sets (never the questions
the benchmarks measure), Python sources on this machine, and the target's own answers.

Each source yields token sequences of at most ``seq_len`` tokens, in a fixed order, so a
run that resumes finds the next sequence where it left off:
- ``prompts``: Spec-Bench, HumanEval and GSM8K questions after the first `HELD_OUT` of
  each category (a bench with ``--limit`` up to that never sees a trained-on question),
  in the model's chat template; with ``respond`` > 0 followed by the target's own greedy
  answer (self-distillation: what the head will see when it drafts);
- ``python``: the standard library's ``.py`` files, as code text, in chunks;
- a path: a text file, or a JSONL file of ``{"text": ...}`` or ``{"prompt": ...}`` lines
  (prompts are answered like the shipped ones).
Sources are interleaved (a prompt, a chunk of code, ...) so a token budget cuts them alike.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from specdec.bench.questions import load_dataset
from specdec.errors import InvalidRequestError

# per dataset: questions of each category kept out of training (the benches take the first)
HELD_OUT = {"spec-bench": 20, "humaneval": 40, "gsm8k": 100}
SOURCES = ("prompts", "python")


@dataclass(frozen=True)
class Item:
    """One training sequence to make: ``tokens``, and whether the target answers them."""

    source: str
    tokens: list[int]
    respond: bool


def held_out_prompts() -> Iterator[tuple[str, str]]:
    """(source, question) of the shipped datasets after their held-out questions."""
    sets = [
        (name, load_dataset(name).select(skip=skip).questions) for name, skip in HELD_OUT.items()
    ]
    for group in zip_longest(*(qs for _, qs in sets)):  # interleaved: a budget cuts all alike
        for (name, _), q in zip(sets, group, strict=True):
            if q is not None:
                yield f"{name}:{q.question_id}", q.turns[0]


def python_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(skip))


def _chunks(tokens: list[int], seq_len: int, least: int = 32) -> Iterator[list[int]]:
    for s in range(0, len(tokens), seq_len):
        if len(tokens[s : s + seq_len]) >= least:
            yield tokens[s : s + seq_len]


def items(
    data: str,
    encode: Callable[[str], list[int]],
    encode_chat: Callable[[str], list[int]],
    seq_len: int,
    respond: int,
) -> Iterator[Item]:
    """The training sequences of ``data`` (comma-separated sources), interleaved."""
    streams = []
    for name in [d.strip() for d in data.split(",") if d.strip()]:
        if name == "prompts":
            streams.append(
                Item(src, encode_chat(text)[: seq_len - respond], respond > 0)
                for src, text in held_out_prompts()
            )
        elif name == "python":
            streams.append(
                Item(f"python:{path.name}", chunk, False)
                for path in python_files()
                for chunk in _chunks(encode(path.read_text(errors="replace")), seq_len)
            )
        else:
            streams.append(_file_items(Path(name), encode, encode_chat, seq_len, respond))
    if not streams:
        raise InvalidRequestError(
            f"--data names no source (sources: {', '.join(SOURCES)}, or a file)"
        )
    for group in zip_longest(*streams):
        for item in group:
            if item is not None and item.tokens:
                yield item


def _file_items(path: Path, encode, encode_chat, seq_len: int, respond: int) -> Iterator[Item]:
    if not path.is_file():
        raise InvalidRequestError(
            f"--data: {str(path)!r} is neither a source ({', '.join(SOURCES)}) nor a file"
        )
    if path.suffix != ".jsonl":
        yield from (Item(path.name, c, False) for c in _chunks(encode(path.read_text()), seq_len))
        return
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise InvalidRequestError(f"{path}:{n}: not a JSON line") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            yield Item(
                f"{path.name}:{n}", encode_chat(obj["prompt"])[: seq_len - respond], respond > 0
            )
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            yield from (
                Item(f"{path.name}:{n}", c, False) for c in _chunks(encode(obj["text"]), seq_len)
            )
        else:
            raise InvalidRequestError(f'{path}:{n}: expected {{"text": ...}} or {{"prompt": ...}}')


def tokenizer_items(data: str, tok, seq_len: int, respond: int) -> Iterator[Item]:
    """`items` of ``data`` with ``tok`` (a `Tokenizer`): prompts in its chat template."""

    def chat(text: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": text}])

    return items(data, tok.encode, chat, seq_len, respond)
