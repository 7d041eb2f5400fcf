"""Cross-vocabulary drafting: a draft model with its own tokenizer drafts for any target.

The draft model and the target need not share a vocabulary (e.g. SmolLM2-135M,
a 49k llama-style BPE, drafting for Qwen2.5-Coder, a 151k BPE). The two meet in
text, the one thing both tokenizers agree on:

1. The committed target tokens are turned into text incrementally
   (`CommittedText`: each new token is decoded in a window of two checkpoints,
   never the whole sequence; tokens that end inside a UTF-8 character wait).
2. That text is re-tokenised by the draft tokenizer over a bounded tail: the
   draft ids of older text are frozen, only the last few dozen draft tokens'
   worth of text is re-encoded each step. The draft model's KV cache is synchronised with those
   ids by their longest common prefix; the rest is rolled back and re-run.
3. The draft model drafts ``k`` of its own tokens greedily; they are decoded to
   text (in the window of the draft tokens before them, an incomplete trailing
   UTF-8 character dropped).
4. The draft text is translated into target tokens at the boundary
   (`translate`): a short tail of committed text (whole target tokens, up to
   the last clean checkpoints) plus the draft text is encoded by the target
   tokenizer; when the encoding starts with exactly the tail's committed ids,
   the tokens after them are the draft. Otherwise the boundary merges (the last
   committed token is the start of a longer token, e.g. " fi" + "b(") and a
   shorter tail, then the draft text alone, are tried. A final check decodes the
   result after the last committed token and requires the draft text back.
5. The target tokens go to the verifier as a chain with ``q`` None: a point
   mass, chosen independently of the target's randomness, so greedy and
   speculative-sampling verification are both exact (see
   `specdec.speculation.verifiers.speculative`).

This is the text-level translation of Hugging Face's universal assisted
generation (assisted decoding with different tokenizers; Timor et al. 2025,
"Accelerating LLM Inference with Lossless Speculative Decoding Algorithms for
Heterogeneous Vocabularies", string-level exact matching) and the
cross-vocabulary setting of OmniDraft (Ramakrishnan et al. 2025, "OmniDraft: A
Cross-vocabulary, Online Adaptive Drafter for On-device Speculative Decoding").

Deviations, none of which affects exactness:
- OmniDraft's online n-gram cache of draft→target token merges and its hybrid
  distillation (training the drafter on the target) are not here: translation
  is recomputed by the tokenizers every step, and the drafter does not learn.
- The draft always drafts greedily, under sampling too. With a point-mass
  proposal the target accepts token ``c`` with probability ``p(c)``, so the
  drafter's likeliest token beats a draw from its distribution on average.
- The last translated target token is kept even though the text after it may
  have merged into a longer token: when it is wrong the target rejects it and
  its own token is the bonus, exactly as if it had been dropped, and when it is
  right it is one more accepted token.
- When the committed tokens end inside a UTF-8 character the step drafts
  nothing (the draft text could not be attached to half a character).
- A draft tokenizer that prepends a space to every encoded string
  (SentencePiece's ``add_dummy_prefix``) sees a spurious space where a frozen
  segment of its ids ends; that costs acceptance, not exactness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from specdec.errors import InvalidRequestError
from specdec.models.target import Target
from specdec.speculation.draft_length import (
    ADAPTIVE_HELP,
    AdaptiveLength,
    DraftLengthPolicy,
    FixedLength,
)
from specdec.speculation.drafters.base import BuildContext, Drafter, DraftState
from specdec.speculation.options import Options, option, optional_str
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome

_REPLACEMENT = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence


class TextTokenizer(Protocol):
    eos_token_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class CommittedText:
    """Token ids → text, incrementally, with checkpoints at clean token boundaries.

    After ``tok_at[i]`` tokens the text is exactly ``text[: char_at[i]]``. A new
    token is decoded in the window from the second-to-last checkpoint (context
    for tokenizers whose decoding depends on neighbours); tokens that end inside
    a UTF-8 character stay pending until the character completes (at most four).
    """

    MAX_PENDING = 4  # a UTF-8 character has at most four bytes

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tok = tokenizer
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.tok_at = [0]
        self.char_at = [0]

    @property
    def pending(self) -> int:
        """Tokens after the last clean checkpoint."""
        return len(self.ids) - self.tok_at[-1]

    def push(self, new_ids: list[int], bulk: bool = False) -> None:
        """Append tokens; ``bulk`` decodes them as one piece (one checkpoint at the end)."""
        if not new_ids:
            return
        if bulk:
            self.ids.extend(new_ids)
            self._advance()
            return
        for token in new_ids:
            self.ids.append(token)
            self._advance()

    def _advance(self) -> None:
        decode = self.tok.decode
        start = self.tok_at[-2] if len(self.tok_at) > 1 else 0
        read = self.tok_at[-1]
        now = decode(self.ids[start:], False)
        if now.endswith(_REPLACEMENT) and self.pending < self.MAX_PENDING:
            return  # wait for the rest of the character
        before = decode(self.ids[start:read], False) if read > start else ""
        self.text += now[len(before) :]
        self.tok_at.append(len(self.ids))
        self.char_at.append(len(self.text))

    def tail(self, min_tokens: int) -> tuple[list[int], str]:
        """The ids and text since the latest checkpoint at least ``min_tokens`` back."""
        i = len(self.tok_at) - 1
        while i > 0 and self.tok_at[-1] - self.tok_at[i] < min_tokens:
            i -= 1
        end = self.tok_at[-1]
        return self.ids[self.tok_at[i] : end], self.text[self.char_at[i] :]


def translate(
    tokenizer: TextTokenizer,
    text: str,
    tails: list[tuple[list[int], str]],
    anchor: list[int],
) -> list[int]:
    """Target tokens for ``text``, which continues committed text ending in each of ``tails``.

    ``tails`` are (committed ids, their text) pairs, longest first; the first one
    whose text plus ``text`` encodes to its own ids followed by more tokens gives
    those tokens; if none does, ``text`` is encoded alone. ``anchor`` (committed
    ids that decode cleanly on their own, the last ones) checks the result:
    decoding ``anchor`` + result must give the anchor's text + ``text``.
    Returns [] when nothing passes.
    """
    if not text:
        return []
    out: list[int] | None = None
    for ids, tail_text in tails:
        if not ids:
            continue
        enc = tokenizer.encode(tail_text + text, add_special_tokens=False)
        if len(enc) > len(ids) and enc[: len(ids)] == ids:
            out = enc[len(ids) :]
            break
    if out is None:
        out = tokenizer.encode(text, add_special_tokens=False)
    if anchor:
        head = tokenizer.decode(anchor, False)
        if tokenizer.decode(anchor + out, False) != head + text:
            return []
    elif tokenizer.decode(out, False) != text:
        return []
    return out


@dataclass(frozen=True)
class CrossVocabOptions(Options):
    method: ClassVar[str] = "cross-vocab"
    draft_model: str | None = option(
        None, "the draft model (any tokenizer): name, GGUF, folder", parse=optional_str
    )
    num_draft_tokens: int = option(
        4, "draft-model tokens drafted per step (the start, if adaptive)", minimum=1
    )
    adaptive: bool = option(False, ADAPTIVE_HELP)


class CrossVocabDrafter(Drafter):
    name = "cross-vocab"
    runs_a_model = True
    description = (
        "a draft model with another tokenizer drafts text; its text is re-tokenised into "
        "target tokens and verified as a chain (universal assisted generation; OmniDraft's "
        "cross-vocabulary setting)"
    )
    Options = CrossVocabOptions

    #: re-encode at most this many draft tokens of committed text per step, keep this many live
    FREEZE_AT, KEEP_LIVE = 48, 12
    #: committed target tokens used as context when translating
    TAIL_TOKENS = 4
    #: draft tokens before the drafted ones used as decoding context
    DECODE_CONTEXT = 4

    def __init__(
        self,
        draft: Target,
        draft_tokenizer: TextTokenizer,
        target_tokenizer: TextTokenizer,
        num_draft_tokens: int = 4,
        policy: DraftLengthPolicy | None = None,
        target_vocab_size: int | None = None,
    ) -> None:
        if num_draft_tokens < 1:
            raise InvalidRequestError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.draft = draft
        self.target_vocab_size = target_vocab_size  # ids the target's embedding table has
        self.dtok = draft_tokenizer
        self.ttok = target_tokenizer
        self.policy = policy or FixedLength(num_draft_tokens)
        self.draft_eos = frozenset(getattr(draft_tokenizer, "eos_token_ids", ()))
        self.committed = CommittedText(target_tokenizer)
        self._reset_draft_ids()
        self.seen: list[int] = []  # draft ids in the draft model's cache, in order
        self.seen_frozen = 0  # how many of them are frozen ids

    @classmethod
    def build(cls, ctx: BuildContext, options: CrossVocabOptions) -> CrossVocabDrafter:
        draft, draft_tokenizer = ctx.draft(options.draft_model, cls.name, same_tokenizer=False)
        kind = AdaptiveLength if options.adaptive else FixedLength
        return cls(
            draft,
            draft_tokenizer,
            ctx.tokenizer,
            policy=kind(options.num_draft_tokens),
            target_vocab_size=ctx.vocab_size,
        )

    def _bos_prefix(self, text: str) -> list[int]:
        """What the draft tokenizer puts before ``text`` (a BOS) unless ``text`` has it already."""
        full = self.dtok.encode(text, add_special_tokens=True)
        plain = self.dtok.encode(text, add_special_tokens=False)
        n = len(full) - len(plain)
        if n > 0 and full[n:] == plain and plain[:n] != full[:n]:
            return full[:n]
        return []

    def _reset_draft_ids(self) -> None:
        self.frozen: list[int] = []  # draft ids of committed text [: frozen_chars]
        self.frozen_chars = 0
        self.live: list[int] = []  # draft ids of committed text [frozen_chars :]
        self.synced_chars = -1  # committed text length the draft ids describe

    def reset(self, prompt_ids: list[int]) -> None:
        self.draft.reset()
        self.seen, self.seen_frozen = [], 0
        self.committed.reset()
        cut = max(0, len(prompt_ids) - 2 * self.TAIL_TOKENS)
        self.committed.push(prompt_ids[:cut], bulk=True)
        self.committed.push(prompt_ids[cut:])
        self._reset_draft_ids()
        self.frozen = self._bos_prefix(self.committed.text[:64])

    # -- keeping up with the committed sequence --------------------------------
    def _follow(self, tokens: list[int]) -> None:
        """Bring the committed text up to ``tokens`` (normally an extension of what it saw)."""
        c = self.committed
        n = len(c.ids)
        if len(tokens) < n or tokens[:n] != c.ids:  # not an extension: start over
            self.reset(tokens)
            return
        c.push(tokens[n:])

    def _draft_ids(self) -> list[int]:
        """The draft tokenizer's ids for the committed text; re-encodes a bounded tail."""
        text = self.committed.text
        if self.synced_chars != len(text):
            tail = text[self.frozen_chars :]
            self.live = self.dtok.encode(tail, add_special_tokens=False)
            if len(self.live) > self.FREEZE_AT:
                for keep in range(self.KEEP_LIVE, self.KEEP_LIVE + 4):  # a cut at a whole char
                    head = self.live[:-keep]
                    s = self.dtok.decode(head, False)
                    if s and not s.endswith(_REPLACEMENT) and tail.startswith(s):
                        self.frozen += head
                        self.frozen_chars += len(s)
                        self.live = self.live[-keep:]
                        break
            self.synced_chars = len(text)
        return self.frozen + self.live

    def _sync(self, ids: list[int]) -> torch.Tensor:
        """Bring the draft cache to ``ids``; returns the logits after the last one."""
        limit = min(len(self.seen), len(ids) - 1)  # always re-run at least the last token
        common = min(self.seen_frozen, limit)  # frozen ids never change: the cache has them
        while common < limit and self.seen[common] == ids[common]:
            common += 1
        self.draft.rollback(len(self.seen) - common)
        logits = self.draft.forward(ids[common:], logits_rows=slice(-1, None))
        self.seen = list(ids)
        self.seen_frozen = len(self.frozen)
        return logits[-1]

    # -- drafting ---------------------------------------------------------------
    def propose(self, state: DraftState) -> DraftTree:
        most = state.budget - 1  # the bonus token always comes on top
        k = self.policy.length()
        if most <= 0:
            return DraftTree()
        self._follow(state.tokens)
        if self.committed.pending:
            return DraftTree()  # ends inside a character: nothing to attach draft text to
        ids = self._draft_ids()
        if not ids or len(ids) + k >= self.draft.max_length:
            return DraftTree()
        logits = self._sync(ids)
        drafted: list[int] = []
        for j in range(k):
            token = int(logits.argmax())
            drafted.append(token)
            if token in self.draft_eos:
                break
            if j < k - 1:
                logits = self.draft.forward([token], logits_rows=slice(-1, None))[-1]
                self.seen.append(token)
        text = self._draft_text(ids, drafted)
        c = self.committed
        tails = [c.tail(self.TAIL_TOKENS), c.tail(1)]
        anchor = c.tail(1)[0]
        out = translate(self.ttok, text, tails, anchor)[:most]
        if self.target_vocab_size is not None:  # a tokenizer larger than the model's table
            for i, t in enumerate(out):
                if t >= self.target_vocab_size:
                    out = out[:i]
                    break
        return DraftTree.chain(out)

    def _draft_text(self, context: list[int], drafted: list[int]) -> str:
        """The text of ``drafted`` after ``context``, cut before any incomplete character."""
        window = context[-self.DECODE_CONTEXT :]
        before = self.dtok.decode(window, False)
        after = self.dtok.decode(window + drafted, False)
        if not after.startswith(before):
            return ""
        text = after[len(before) :]
        cut = text.find(_REPLACEMENT)
        return text if cut < 0 else text[:cut]

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        self.policy.observe(len(tree), len(outcome.path))
