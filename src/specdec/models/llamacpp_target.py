"""A `Target` on llama.cpp's own kernels (``--backend llamacpp``), through `llama-cpp-python`'s
low-level API, so that speculation can be compared with llama.cpp on equal footing.

How a pass maps onto llama.cpp:
- a chain (or the prefill) is one batch in sequence 0, split into ``n_batch`` pieces;
- a token tree is one batch in which each node carries the sequence id of every leaf
  whose root-to-leaf path goes through it (leaf ``l`` is sequence ``l``), so a node sees
  exactly its ancestors. The committed tokens are first copied into every leaf's
  sequence (``llama_memory_seq_cp``, cheap with a unified KV cache, which a tree batch
  needs: ``kv_unified``, and ``n_seq_max`` >= leaves);
- ``keep`` (the accepted path) keeps the sequence of a leaf below the last accepted
  node (``seq_keep``), drops what lies deeper (``seq_rm``) and moves it back to
  sequence 0; ``rollback`` removes the last positions of sequence 0;
- logits are read only for the rows asked for (each row of the 1.5B's LM head costs
  about as much as a tenth of a step).

Flash attention is pinned on (llama.cpp's own default; `Llama(...)` turns it off, and
greedy outputs of the two settings part after a few dozen tokens). Numerics are
llama.cpp's: a node's logits equal those of its path run as a chain padded to the same
batch size, but a batch's size moves logits slightly, so greedy outputs can part from
one-token decoding at near-ties (the tests and the benchmark explain each with its
margin). Methods that need hidden states or a subset of layers are refused.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specdec.errors import InvalidRequestError, ModelFormatError, UnsupportedModelError

MAX_LEAVES = 64  # sequences a tree may use (n_seq_max)


@dataclass(frozen=True)
class LlamaCppConfig:
    vocab_size: int
    max_position_embeddings: int


@dataclass
class _Pass:
    start: int  # committed length before the pass
    positions: list[int]
    seqs: list[list[int]] | None  # per node, the leaves through it (None: a chain)


class LlamaCppTarget:
    """llama.cpp context over one GGUF file: the `Target` operations (see models.target)."""

    def __init__(self, path: str | Path, *, n_ctx: int = 4096, threads: int | None = None):
        try:
            import llama_cpp as L  # optional extra (specdec[llamacpp]), needed only here
        except ImportError:
            raise UnsupportedModelError(
                "--backend llamacpp needs llama-cpp-python: pip install 'specdec[llamacpp]'"
            ) from None
        self._L = L
        quiet_logs(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self._model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise ModelFormatError(f"{path}: llama.cpp cannot load this file")
        train_ctx = L.llama_model_n_ctx_train(self._model)
        cp = L.llama_context_default_params()
        cp.n_ctx = min(n_ctx, train_ctx) if train_ctx > 0 else n_ctx
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = MAX_LEAVES
        cp.kv_unified = True
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.n_threads = cp.n_threads_batch = threads or torch.get_num_threads()
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise ModelFormatError(f"{path}: llama.cpp cannot create a context")
        self._mem = L.llama_get_memory(self._ctx)
        self._n_batch = cp.n_batch
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        self.config = LlamaCppConfig(vocab, int(L.llama_n_ctx(self._ctx)))
        self._len = 0
        self._last: _Pass | None = None

    def __del__(self) -> None:
        L = getattr(self, "_L", None)
        if L is not None and getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            L.llama_model_free(self._model)
            self._ctx = None

    @property
    def length(self) -> int:
        return self._len

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def reset(self) -> None:
        self._L.llama_memory_clear(self._mem, True)
        self._len = 0
        self._last = None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: list[int],
        positions: list[int] | None = None,
        attn_mask: torch.Tensor | None = None,
        logits_rows: slice | list[int] | None = None,
        **kw,
    ) -> torch.Tensor:
        if kw.get("layers") is not None or kw.get("return_hidden"):
            raise InvalidRequestError(
                "the llama.cpp backend gives logits only: methods that need hidden states "
                "or a subset of layers need --backend native"
            )
        n = len(tokens)
        if n == 0:
            raise InvalidRequestError("empty pass")
        if self._len + n > self.max_length:
            raise InvalidRequestError(
                f"{self._len + n} tokens do not fit the llama.cpp context of {self.max_length}"
            )
        positions = list(range(self._len, self._len + n)) if positions is None else list(positions)
        rows = _rows(logits_rows, n)
        seqs = None if attn_mask is None else self._tree_sequences(attn_mask, n)
        if seqs is not None:
            for leaf in range(1, 1 + max(max(s) for s in seqs)):
                self._L.llama_memory_seq_cp(self._mem, 0, leaf, -1, -1)
        want = set(rows)
        out = []
        for lo in range(0, n, self._n_batch):
            hi = min(n, lo + self._n_batch)
            self._decode(tokens, positions, seqs, want, lo, hi)
            out += [self._logits_row(i - lo) for i in rows if lo <= i < hi]
        self._last = _Pass(self._len, positions, seqs)
        self._len += n
        return torch.from_numpy(np.stack(out)) if out else torch.empty(0, self.config.vocab_size)

    def _tree_sequences(self, mask: torch.Tensor, n: int) -> list[list[int]]:
        """Per node, the leaves whose paths go through it (leaf l is sequence l)."""
        mask = mask.to(torch.bool)
        if mask.shape != (n, n):
            raise InvalidRequestError(
                "the llama.cpp backend takes trees over the new tokens only "
                f"(a ({n}, {n}) mask), got {tuple(mask.shape)}"
            )
        seen_by_others = (mask & ~torch.eye(n, dtype=torch.bool)).any(dim=0)
        leaves = [i for i in range(n) if not seen_by_others[i]]
        if len(leaves) > MAX_LEAVES:
            raise InvalidRequestError(
                f"a tree of {len(leaves)} leaves exceeds the llama.cpp backend's {MAX_LEAVES}"
            )
        return [[li for li, leaf in enumerate(leaves) if mask[leaf, j]] for j in range(n)]

    def _decode(self, tokens, positions, seqs, want, lo: int, hi: int) -> None:
        L = self._L
        count = hi - lo
        width = 1 if seqs is None else max(len(s) for s in seqs[lo:hi])
        batch = L.llama_batch_init(count, 0, width)
        try:
            for b, i in enumerate(range(lo, hi)):
                batch.token[b] = tokens[i]
                batch.pos[b] = positions[i]
                ids = [0] if seqs is None else seqs[i]
                batch.n_seq_id[b] = len(ids)
                for k, s in enumerate(ids):
                    batch.seq_id[b][k] = s
                batch.logits[b] = 1 if i in want else 0
            batch.n_tokens = count
            rc = L.llama_decode(self._ctx, batch)
        finally:
            L.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits_row(self, i: int) -> np.ndarray:
        ptr = self._L.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.config.vocab_size,)
        ).copy()

    # ------------------------------------------------------------------ cache edits
    def rollback(self, n: int) -> None:
        if not 0 <= n <= self._len:
            raise ValueError(f"cannot roll back {n} of {self._len} tokens")
        self._L.llama_memory_seq_rm(self._mem, 0, self._len - n, -1)
        self._len -= n
        self._last = None

    def keep(self, indices: list[int]) -> None:
        """Keep the nodes ``indices`` (a root-to-node path, in order) of the latest pass."""
        last = self._last
        if last is None:
            raise InvalidRequestError("keep() needs a pass before it")
        n = self._len - last.start
        if not indices or indices[0] != 0 or any(not 0 <= i < n for i in indices):
            raise ValueError(f"bad indices {indices} for a pass of {n} tokens")
        L, mem = self._L, self._mem
        end = last.positions[indices[-1]] + 1  # positions of a path are consecutive
        if last.seqs is None:
            if indices != list(range(len(indices))):
                raise ValueError("a chain keeps a prefix")
            L.llama_memory_seq_rm(mem, 0, end, -1)
        else:
            leaf = last.seqs[indices[-1]][0]  # every leaf below the last node holds the path
            if any(leaf not in last.seqs[i] for i in indices):
                raise ValueError(f"indices {indices} are not a path of the tree")
            L.llama_memory_seq_keep(mem, leaf)
            L.llama_memory_seq_rm(mem, leaf, end, -1)
            if leaf != 0:
                L.llama_memory_seq_cp(mem, leaf, 0, -1, -1)
                L.llama_memory_seq_rm(mem, leaf, -1, -1)
        self._len = last.start + len(indices)
        self._last = None


_LOG_CALLBACK = None


def quiet_logs(L) -> None:
    """Silence llama.cpp (the ``llama_cpp`` module ``L``): it writes its loading chatter to
    stderr; keep it there only on request (SPECDEC_LLAMA_LOG=1), so that commands print
    what they promise. Idempotent."""
    global _LOG_CALLBACK

    if _LOG_CALLBACK is None and os.environ.get("SPECDEC_LLAMA_LOG") != "1":
        _LOG_CALLBACK = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())


def _rows(logits_rows: slice | list[int] | None, n: int) -> list[int]:
    if logits_rows is None:
        return list(range(n))
    if isinstance(logits_rows, slice):
        return list(range(n))[logits_rows]
    return [int(r) for r in logits_rows]
