"""A retrieval datastore: a corpus tokenised by the target, and a suffix array over it.

For REST (`specdec.speculation.drafters.retrieval`). On disk, one folder:

- ``tokens.bin``: int32 token ids of every document, each followed by -1 (a
  separator no match or continuation crosses);
- ``suffixes.bin``: int32 positions of ``tokens.bin``, sorted by the
  ``SPAN`` tokens that start there (a suffix array truncated to the longest
  span ever matched: enough for exact-match lookups of up to ``SPAN`` tokens,
  and built with one lexicographic sort instead of a full suffix sort);
- ``meta.json``: format, the tokenizer's fingerprint, sizes, and the inputs.

Both arrays are read memory-mapped, so loading costs nothing and the pages a
lookup touches are all it reads.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from specdec.errors import InvalidRequestError, ModelFormatError

FORMAT = 1
SPAN = 16  # longest suffix matched (REST: 16)
SEPARATOR = -1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies the token ids a datastore holds: a hash of the tokenizer's vocabulary."""
    vocab = sorted(tokenizer.vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for piece, i in vocab:
        h.update(f"{i}\t{piece}\n".encode())
    return h.hexdigest()[:16]


def stdlib_sources() -> list[Path]:
    """The Python standard library's own modules (no tests, no installed packages): a real
    code corpus every machine with Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in rel:
            continue
        out.append(f)
    return out


def input_files(specs: Iterable[str]) -> list[Path]:
    """Files from ``specs``: files, folders (every .py .md .txt .rst .json .jsonl below) or
    ``stdlib``."""
    files: list[Path] = []
    for spec in specs:
        if spec == "stdlib":
            files += stdlib_sources()
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            found = [
                f
                for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix in (".py", ".md", ".txt", ".rst", ".json", ".jsonl")
            ]
            if not found:
                raise InvalidRequestError(f"{spec}: no .py/.md/.txt/.rst/.json(l) files below")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InvalidRequestError(f"{spec}: no such file or folder")
    if not files:
        raise InvalidRequestError("no input files")
    return files


def build(
    tokenizer: Any,
    files: list[Path],
    out: str | Path,
    *,
    progress: bool = True,
    batch: int = 64,
) -> dict[str, Any]:
    """Tokenise ``files`` and write a datastore folder at ``out`` (replaced atomically)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    chunks: list[list[int]] = []
    bar = tqdm(total=len(files), desc="tokenising", unit="file", disable=not progress)
    for i in range(0, len(files), batch):
        texts = []
        for f in files[i : i + batch]:
            try:
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
            except OSError as e:
                raise InvalidRequestError(f"cannot read {f}: {e}") from None
        chunks += tokenizer.encode_many(texts)
        bar.update(len(texts))
    bar.close()
    extra = {
        "inputs": sorted({str(f.parent) for f in files})[:50],
        "build_s": time.perf_counter() - t0,  # tokenising; write() adds the indexing
    }
    return write(chunks, out, tokenizer_fingerprint(tokenizer), progress=progress, **extra)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def write(
    documents: list[np.ndarray] | list[list[int]],
    out: str | Path,
    fingerprint: str,
    *,
    progress: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Index tokenised documents into a datastore folder at ``out`` (replaced atomically)."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not (out / "meta.json").is_file() and not _is_empty_dir(out):
        # never delete what is not ours: only a datastore folder (or an empty one) is replaced
        raise InvalidRequestError(f"{out} exists and is not a datastore; choose another --out")
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    parts = [np.append(np.asarray(d, dtype=np.int32), np.int32(SEPARATOR)) for d in documents]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if len(tokens) >= 2**31 - SPAN:
        raise InvalidRequestError(f"{len(tokens)} tokens: too many for one datastore")
    if progress:
        print(f"sorting the suffixes of {len(tokens):,} tokens ...", flush=True)
    suffixes = suffix_array(tokens)
    tokens.tofile(tmp / "tokens.bin")
    suffixes.tofile(tmp / "suffixes.bin")
    meta = {
        "format": FORMAT,
        "span": SPAN,
        "tokenizer": fingerprint,
        "tokens": int(len(tokens)),
        "documents": len(documents),
        "bytes": int(tokens.nbytes + suffixes.nbytes),
        **extra,
    }
    meta["build_s"] = round(time.perf_counter() - t0 + extra.get("build_s", 0.0), 1)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Positions sorted by their next ``SPAN`` tokens (past the end: padded with the
    separator, which sorts first)."""
    n = len(tokens)
    padded = np.concatenate([tokens, np.full(SPAN, SEPARATOR, dtype=np.int32)])
    # np.lexsort sorts by the last key first: give it token SPAN-1 first, token 0 last
    keys = [padded[j : j + n] for j in range(SPAN - 1, -1, -1)]
    return np.lexsort(keys).astype(np.int32)


def default_path(tokenizer: Any) -> Path:
    """Where the default code datastore (the standard library) for a tokenizer lives."""
    from specdec.models.catalog import cache_dir

    return cache_dir() / "datastores" / tokenizer_fingerprint(tokenizer) / "python-stdlib"


def open_datastore(spec: str | None, tokenizer: Any, progress: bool = True) -> Datastore:
    """A datastore folder, or None/"stdlib": the default one, built on first use."""
    if spec and spec != "stdlib":
        return Datastore(spec, tokenizer)
    path = default_path(tokenizer)
    if not (path / "meta.json").exists():
        import logging

        logging.getLogger("specdec").info(
            "building the default datastore (the Python standard library) at %s, once", path
        )
        build(tokenizer, stdlib_sources(), path, progress=progress)
    return Datastore(path, tokenizer)


class Datastore:
    """A built datastore, memory-mapped."""

    def __init__(self, folder: str | Path, tokenizer: Any | None = None) -> None:
        folder = Path(folder)
        meta_file = folder / "meta.json"
        if not meta_file.exists():
            raise InvalidRequestError(
                f"{folder}: no datastore here (build one: specdec datastore build)"
            )
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ModelFormatError(f"{folder}: datastore format {self.meta.get('format')}")
        if tokenizer is not None and self.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise InvalidRequestError(
                f"{folder} was built with another tokenizer than the model's; build one for it"
            )
        self.folder = folder
        n = self.meta["tokens"]
        if n == 0:
            self.tokens = np.zeros(0, dtype=np.int32)
            self.suffixes = np.zeros(0, dtype=np.int32)
        else:
            # plain ndarray views of the maps: the pages are still read on demand, but
            # indexing skips np.memmap's per-item Python overhead (a lookup does ~40)
            self.tokens = np.asarray(
                np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r", shape=(n,))
            )
            self.suffixes = np.asarray(
                np.memmap(folder / "suffixes.bin", dtype=np.int32, mode="r", shape=(n,))
            )
        self.span = self.meta["span"]

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.suffixes.nbytes)

    def _bound(self, query: list[int], upper: bool) -> int:
        """First suffix-array index whose suffix's first len(query) tokens are >= query
        (> query if ``upper``)."""
        lo, hi, m, tokens = 0, len(self.suffixes), len(query), self.tokens
        while lo < hi:
            mid = (lo + hi) // 2
            p = int(self.suffixes[mid])
            # a separator inside sorts below every token, as in the sort: no special case
            head = tokens[p : p + m].tolist()
            if head < query or (upper and head == query):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def lookup(self, query: list[int]) -> np.ndarray:
        """Positions right after each occurrence of ``query`` (in suffix-array order)."""
        if not query or len(query) > self.span or len(self.suffixes) == 0:
            return np.zeros(0, dtype=np.int64)
        lo = self._bound(query, upper=False)
        hi = self._bound(query, upper=True)
        return self.suffixes[lo:hi].astype(np.int64) + len(query)

    def continuations(self, starts: np.ndarray, length: int) -> list[tuple[int, ...]]:
        """The ``length`` tokens from each start, cut at a document's end."""
        if len(starts) == 0:
            return []
        idx = np.minimum(starts[:, None] + np.arange(length), len(self.tokens) - 1)
        rows = np.asarray(self.tokens[idx])
        beyond = np.cumsum(rows == SEPARATOR, axis=1) > 0
        beyond |= (starts[:, None] + np.arange(length)) >= len(self.tokens)
        out = []
        for row, cut in zip(rows.tolist(), beyond.tolist(), strict=True):
            n = cut.index(True) if True in cut else length
            if n:
                out.append(tuple(row[:n]))
        return out
