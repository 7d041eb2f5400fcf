"""Token sequences and the target's hidden states at every position, kept on disk.

A store is a folder: ``tokens.bin`` (int32), ``hidden.bin`` (float16, one row of the
target's hidden size per token) and ``index.json`` (the sequences' offsets and lengths,
what the features were computed with). A sequence's data is written before the index
names it, so a run cut short keeps every sequence its index lists and a resumed run
appends after them; bytes past the index are cut off on open. Reads are memory-mapped:
a store much larger than memory trains as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.errors import SpecdecError

INDEX, TOKENS, HIDDEN = "index.json", "tokens.bin", "hidden.bin"


class FeatureStore:
    def __init__(self, folder: str | Path, hidden_size: int, identity: str) -> None:
        """Open (or start) the store in ``folder`` for features of ``hidden_size`` computed
        by the target ``identity``; one made by another target is started again."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.d, self.identity = hidden_size, identity
        self.sequences: list[tuple[int, int]] = []  # (first token, length)
        self.sources: list[str] = []  # where each sequence came from
        index = self.folder / INDEX
        if index.exists():
            try:
                data = json.loads(index.read_text())
                ok = data["identity"] == identity and int(data["hidden_size"]) == hidden_size
                if ok:
                    self.sequences = [(int(a), int(b)) for a, b in data["sequences"]]
                    self.sources = list(data.get("sources") or [""] * len(self.sequences))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # damaged: start again
        n = self.tokens
        for name, width in ((TOKENS, 4), (HIDDEN, 2 * hidden_size)):
            path = self.folder / name
            with open(path, "ab") as f:  # drop what a cut-short run wrote past the index
                f.truncate(n * width)
        self._maps: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def tokens(self) -> int:
        return sum(length for _, length in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def append(self, tokens: list[int], hidden: torch.Tensor, source: str = "") -> None:
        """Add one sequence: its tokens and the target's hidden states (len(tokens), d)."""
        if hidden.shape != (len(tokens), self.d):
            raise ValueError(f"hidden must be ({len(tokens)}, {self.d}), got {tuple(hidden.shape)}")
        start = self.tokens
        with open(self.folder / TOKENS, "ab") as f:
            f.write(np.asarray(tokens, dtype=np.int32).tobytes())
        with open(self.folder / HIDDEN, "ab") as f:
            f.write(hidden.detach().to(torch.float16).cpu().numpy().tobytes())
        self.sequences.append((start, len(tokens)))
        self.sources.append(source)
        self._write_index()
        self._maps = None

    def _write_index(self) -> None:
        data: dict[str, Any] = {
            "identity": self.identity,
            "hidden_size": self.d,
            "sequences": self.sequences,
            "sources": self.sources,
        }
        tmp = self.folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.folder / INDEX)

    def _mapped(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            n = self.tokens
            if n == 0:
                raise SpecdecError(f"{self.folder}: no features computed yet")
            toks = np.memmap(self.folder / TOKENS, dtype=np.int32, mode="r", shape=(n,))
            hid = np.memmap(self.folder / HIDDEN, dtype=np.float16, mode="r", shape=(n, self.d))
            self._maps = (toks, hid)
        return self._maps

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``i``: its tokens (long) and hidden states (float32)."""
        start, length = self.sequences[i]
        toks, hid = self._mapped()
        return (
            torch.from_numpy(np.array(toks[start : start + length], dtype=np.int64)),
            torch.from_numpy(np.array(hid[start : start + length], dtype=np.float32)),
        )

    def token_counts(self, vocab: int) -> torch.Tensor:
        """How often each token id occurs in the store."""
        toks, _ = self._mapped()
        return torch.from_numpy(np.bincount(np.asarray(toks), minlength=vocab)[:vocab].copy())
