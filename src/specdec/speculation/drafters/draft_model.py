"""Draft-model speculation (Leviathan et al. 2023; Chen et al. 2023): a small model of
the same vocabulary drafts a chain of ``k`` tokens, autoregressively.

The drafter keeps its own KV cache in step with the committed sequence: before
drafting it rolls back whatever the target rejected (the longest common prefix
of what it has seen and what was committed survives) and runs the tokens it has
not seen yet in one pass. Under sampling each drafted token is drawn from the
drafter's distribution shaped by the same temperature / top-k / top-p as the
target's, and that distribution travels with the node for the verifier.
How many tokens to draft is the policy's call (`specdec.speculation.sizing`).

With the ``draft_vocab`` option the draft computes its logits over part of the
vocabulary only (`specdec.models.target.VocabSubset`: the LM head restricted to
those rows, -inf elsewhere), as FR-Spec (Zhao et al. 2025) does for drafts whose
head is a large share of their cost. Deviation from FR-Spec, which ranks tokens by
their frequency in a corpus: here the subset is the lowest token ids (byte-level
BPE numbers tokens in merge order, roughly most frequent first) and the end
tokens, since no corpus statistics ship with the models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.models.pass_cost import PassCost
from specdec.models.target import NativeTarget, Target, VocabSubset
from specdec.speculation.draft_length import (
    ADAPTIVE_HELP,
    AdaptiveLength,
    DraftLengthPolicy,
    FixedLength,
)
from specdec.speculation.drafters.base import BuildContext, Drafter, DraftState
from specdec.speculation.options import Options, one_of, option, optional_str
from specdec.speculation.sampling import SamplingParams, probabilities, sample
from specdec.speculation.sizing import TreeBudget
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Outcome, Verifier
from specdec.speculation.without_replacement import beam_level, conditionals, gumbel_top_k


def check_tree_sampling(static_tree: bool, siblings: str, verifier: str) -> None:
    """How siblings are drawn and which rule verifies them: the combinations that are exact."""
    siblings = siblings.replace("-", "_")
    if siblings not in ("iid", "without_replacement", "beam"):
        raise InvalidRequestError(
            f"siblings must be iid, without-replacement or beam, got {siblings!r}"
        )
    if verifier not in ("specinfer", "spectr"):
        raise InvalidRequestError(f"verifier must be specinfer or spectr, got {verifier!r}")
    if (siblings != "iid" or verifier != "specinfer") and not static_tree:
        raise InvalidRequestError(
            f"siblings={siblings} / verifier={verifier} apply to a static tree: add tree=3,2,1"
        )
    if verifier == "spectr" and siblings != "iid":
        raise InvalidRequestError(
            "verifier=spectr selects among i.i.d. siblings (siblings=iid); siblings drawn "
            f"{'by beam search' if siblings == 'beam' else 'without replacement'} are verified "
            "exactly by recursive rejection sampling (verifier=specinfer)"
        )


@dataclass(frozen=True)
class DraftingOptions(Options):
    """How a drafter that runs a model drafts: a chain or a tree, how big, how sampled."""

    method: ClassVar[str] = "draft"
    num_draft_tokens: int = option(
        4, "tokens drafted per step (the start, if adaptive)", minimum=1
    )
    tree: str | None = option(
        None,
        "draft a tree instead of a chain: 'dynamic' (grown by the drafter's path probability, "
        "sized by the measured pass costs) or a static shape, children per node at each "
        "depth, e.g. 3,2,1",
        parse=optional_str,
    )
    tree_width: int = option(4, "dynamic tree: nodes expanded per depth, children per node", minimum=1)
    tree_depth: int = option(8, "dynamic tree: most depths", minimum=1)
    tree_nodes: int = option(32, "dynamic tree: most nodes verified in one pass", minimum=1)
    siblings: str = option(
        "iid",
        "static tree under sampling: siblings drawn i.i.d. (SpecInfer, SpecTr), without "
        "replacement (RSD-C), or by stochastic beam search of width max(tree) (RSD-S); "
        "greedy drafts the top tokens (beam: beam search)",
        parse=one_of("iid", "without-replacement", "beam"),
    )
    verifier: str = option(
        "specinfer",
        "static tree under sampling: recursive rejection sampling (specinfer) or SpecTr's "
        "k-sequential selection (spectr, needs siblings=iid)",
        parse=one_of("specinfer", "spectr"),
    )
    adaptive: bool = option(False, ADAPTIVE_HELP)
    confidence: float = option(
        0.0, "stop drafting when the drafter's top probability falls below this", minimum=0.0
    )

    @property
    def dynamic(self) -> bool:
        return str(self.tree).strip().lower() == "dynamic"

    @property
    def branching(self) -> list[int] | None:
        """A static tree's children per node at each depth, or None."""
        if not self.tree or self.dynamic or str(self.tree).strip().lower() in ("none", "chain"):
            return None
        try:
            return [int(x) for x in str(self.tree).split(",")]
        except ValueError:
            raise InvalidRequestError(
                f"tree must be 'dynamic' or look like 3,2,1, got {self.tree!r}"
            ) from None

    def check(self) -> None:
        check_tree_sampling(self.branching is not None, self.siblings, self.verifier)


@dataclass(frozen=True)
class DraftModelOptions(DraftingOptions):
    method: ClassVar[str] = "draft"
    draft_model: str | None = option(
        None, "the draft model (name, GGUF, folder)", parse=optional_str
    )
    draft_quant: str | None = option(
        None,
        "the draft's weights: gguf (its file's own blocks), int8, int4 (requantised per 32 "
        "values), none (float); default: as the target's (--quant)",
        parse=one_of("gguf", "int8", "int4", "none"),
    )
    draft_vocab: int = option(
        0,
        "the draft's logits over the N lowest token ids only (and the end tokens): its LM head "
        "at N/vocabulary of the cost; byte-level BPE numbers tokens in merge order, roughly "
        "most frequent first. 0: the whole vocabulary",
        minimum=0,
    )


def shape_arguments(
    ctx: BuildContext, o: DraftingOptions, draft_cost: Callable[[], PassCost] | None
) -> dict[str, Any]:
    """The drafter's keyword arguments for the shape ``o`` asks for; ``draft_cost`` gives
    the drafter's pass-cost curve, which a dynamic tree needs (with the target's)."""
    budget = None
    if o.dynamic:
        if ctx.pass_cost is None or draft_cost is None:
            raise InvalidRequestError("tree=dynamic needs the measured pass costs of a target")
        budget = TreeBudget(ctx.pass_cost(), draft_cost(), max_nodes=o.tree_nodes)
    kind = AdaptiveLength if o.adaptive else FixedLength
    return {
        "policy": kind(o.num_draft_tokens, confidence=o.confidence),
        "branching": o.branching,
        "tree_budget": budget,
        "width": o.tree_width,
        "max_depth": o.tree_depth,
        "sibling_sampling": o.siblings,
        "verify": o.verifier,
    }


def vocab_subset(ctx: BuildContext, draft: Target, n: int) -> Target:
    """``draft`` computing logits over token ids below ``n`` and the end tokens only."""
    if not isinstance(draft, NativeTarget):
        raise InvalidRequestError("draft_vocab needs a draft on the native backend")
    vocab = draft.config.vocab_size
    ends = [t for t in ctx.tokenizer.eos_token_ids if t < vocab]
    return VocabSubset(draft, torch.cat([torch.arange(min(n, vocab)), torch.tensor(ends)]))


class DraftModelDrafter(Drafter):
    name = "draft"
    runs_a_model = True
    description = (
        "a small draft model of the same vocabulary proposes a chain or a tree (static, "
        "multi-draft, or dynamic and sized by measured pass costs); the target verifies it in "
        "one pass (Leviathan et al. 2023, Chen et al. 2023; SpecInfer, SpecTr, RSD, "
        "EAGLE-2/DySpec trees)"
    )
    Options = DraftModelOptions

    def __init__(
        self,
        draft: Target,
        vocab_size: int,
        num_draft_tokens: int = 4,
        policy: DraftLengthPolicy | None = None,
        branching: list[int] | None = None,
        sibling_sampling: str = "iid",
        verify: str = "specinfer",
        tree_budget: TreeBudget | None = None,
        width: int = 4,
        max_depth: int = 8,
    ) -> None:
        if num_draft_tokens < 1:
            raise InvalidRequestError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.draft = draft
        self.vocab_size = vocab_size  # the target's: q rows must align with the target's p rows
        self.policy = policy or FixedLength(num_draft_tokens)
        # children per node at each depth, e.g. [3, 2, 1]: a static tree instead of a chain
        if branching is not None and (not branching or min(branching) < 1):
            raise InvalidRequestError(f"tree branching must be positive integers, got {branching}")
        self.branching = branching
        # how a static tree's siblings are drawn under sampling, and which rule verifies them
        check_tree_sampling(branching is not None, sibling_sampling, verify)
        self.sibling_sampling, self.verify = sibling_sampling.replace("-", "_"), verify
        # a dynamic tree sized by measured costs (see _propose_dynamic) when a budget is given
        if tree_budget is not None and (width < 1 or max_depth < 1):
            raise InvalidRequestError("a dynamic tree needs width >= 1 and max_depth >= 1")
        self.tree_budget, self.width, self.max_depth = tree_budget, width, max_depth
        self._predicted = 0.0  # path probability of the last dynamic tree
        self.seen: list[int] = []  # tokens in the draft model's cache, in order

    @classmethod
    def build(cls, ctx: BuildContext, options: DraftModelOptions) -> DraftModelDrafter:
        o = options
        quant = {"quant": o.draft_quant} if o.draft_quant else {}  # else the target's
        draft = ctx.draft(o.draft_model, cls.name, **quant)
        costs = None
        if ctx.draft_pass_cost is not None:  # measured only if a dynamic tree asks
            costs = lambda: ctx.draft_pass_cost(o.draft_model, **quant)  # noqa: E731
        if o.draft_vocab:
            draft = vocab_subset(ctx, draft, o.draft_vocab)
        return cls(draft, ctx.vocab_size, **shape_arguments(ctx, o, costs))

    def reset(self, prompt_ids: list[int]) -> None:
        self.draft.reset()
        self.seen = []

    def _sync(self, tokens: list[int]) -> torch.Tensor:
        """Bring the draft cache to ``tokens``; returns the logits after the last one."""
        common = 0
        limit = min(len(self.seen), len(tokens) - 1)  # always re-run at least the last token
        while common < limit and self.seen[common] == tokens[common]:
            common += 1
        self.draft.rollback(len(self.seen) - common)
        logits = self.draft.forward(tokens[common:], logits_rows=slice(-1, None))
        self.seen = list(tokens)
        return logits[-1]

    def prepare(self, tokens: list[int]) -> None:
        if len(tokens) > 1 and len(tokens) < self.draft.max_length:
            self._sync(tokens)

    def _q(self, logits: torch.Tensor, state: DraftState) -> torch.Tensor:
        q = probabilities(logits, state.sampling)
        if q.shape[-1] != self.vocab_size:  # embedding tables padded differently
            pad = self.vocab_size - q.shape[-1]
            q = torch.nn.functional.pad(q, (0, pad)) if pad > 0 else q[: self.vocab_size]
        return q

    def propose(self, state: DraftState) -> DraftTree:
        if self.tree_budget is not None:
            return self._propose_dynamic(state)
        if self.branching is not None and self.sibling_sampling == "beam":
            return self._propose_beam(state)
        if self.branching is not None:
            return self._propose_tree(state)
        k = min(self.policy.length(), state.budget - 1)  # the bonus token always comes on top
        if k <= 0 or len(state.tokens) + k >= self.draft.max_length:
            return DraftTree()
        logits = self._sync(state.tokens)
        greedy = state.sampling.greedy
        tokens: list[int] = []
        qs: list[torch.Tensor | None] = []
        for j in range(k):
            if greedy:
                token, q = int(logits.argmax()), None
            else:
                q = self._q(logits, state)
                token = sample(q, state.rng)
            tokens.append(token)
            qs.append(q)
            if self.policy.confidence > 0:
                top = float((q if q is not None else logits.float().softmax(-1)).max())
                if not self.policy.keep_going(top):
                    break
            if j < k - 1:
                logits = self.draft.forward([token], logits_rows=slice(-1, None))[-1]
                self.seen.append(token)
        return DraftTree.chain(tokens, qs)

    def _children(self, logits: torch.Tensor, width: int, state: DraftState):
        """``width`` children of a node: the top tokens (greedy, q None); under sampling
        i.i.d. draws sharing the drafter's q (SpecInfer, SpecTr), or draws without
        replacement by Gumbel-Top-k, each with its conditional q: q without the earlier
        siblings, renormalised (RSD-C; fewer children if q has fewer tokens)."""
        if state.sampling.greedy:
            return [(int(t), None) for t in torch.topk(logits, width).indices]
        q = self._q(logits, state)
        if self.sibling_sampling == "without_replacement":
            tokens, qs = gumbel_top_k(q, width, state.rng)
            return list(zip(tokens, qs, strict=True))
        return [(sample(q, state.rng), q) for _ in range(width)]

    def _propose_beam(self, state: DraftState) -> DraftTree:
        """RSD-S (Jeon et al. 2024): the tree of a stochastic beam search over the drafter
        (Kool et al. 2019), beam width ``max(branching)``, one depth per entry of ``branching``.

        Each depth keeps the beam's best children by perturbed sequence log
        probability (`specdec.speculation.without_replacement.beam_level`). A parent's kept
        children are its first draws without replacement, so each carries its
        conditional q and `SpeculativeSampler` verifies the tree exactly. Under
        greedy it is plain beam search over the drafter's log probabilities (q None).
        """
        width = max(self.branching)
        depth_limit = min(len(self.branching), state.budget - 1)
        if depth_limit <= 0 or len(state.tokens) + depth_limit >= self.draft.max_length:
            return DraftTree()
        greedy = state.sampling.greedy
        rows = self._sync(state.tokens).unsqueeze(0)
        tree, slots = DraftTree(), {}
        beam, log_p, scores = [-1], torch.zeros(1), torch.zeros(1)
        for depth in range(depth_limit):
            if greedy:
                qs = None
                log_q = rows.double().log_softmax(-1)
                pad = self.vocab_size - log_q.shape[-1]
                if pad > 0:
                    log_q = torch.nn.functional.pad(log_q, (0, pad), value=-math.inf)
                log_q = log_q[:, : self.vocab_size]
            else:
                qs = [self._q(row, state) for row in rows]
                log_q = torch.stack(qs).double().log()
            kept = beam_level(log_q, log_p, scores, width, state.rng, noise=not greedy)
            kept.sort(key=lambda c: c[0])  # by parent; stable: best first within a parent
            level = []
            for b, parent in enumerate(beam):
                tokens = [token for i, token, _, _ in kept if i == b]
                conds = conditionals(qs[b], tokens) if qs is not None else [None] * len(tokens)
                for token, q in zip(tokens, conds, strict=True):
                    level.append(tree.add(token, parent, q))
            if depth == depth_limit - 1 or not self._room(state, len(slots) + len(level)):
                break
            rows = self._run_nodes(tree, level, slots, len(state.tokens))
            beam = level
            log_p = torch.tensor([c[2] for c in kept], dtype=torch.float64)
            scores = torch.tensor([c[3] for c in kept], dtype=torch.float64)
        self.draft.rollback(len(slots))
        return tree

    def verifier(self, sampling: SamplingParams) -> Verifier | None:
        """SpecTr's k-sequential selection when configured for it, under sampling."""
        if self.verify == "spectr" and not sampling.greedy:
            from specdec.speculation.verifiers.spectr import SpecTrVerifier

            return SpecTrVerifier()
        return None

    def _propose_tree(self, state: DraftState) -> DraftTree:
        """A static tree (SpecInfer-style token tree): ``branching[d]`` children per node at depth d.

        Each depth is one draft pass over the nodes drafted at the depth before,
        on top of the tree's earlier levels kept in the draft cache; the tree's
        slots are rolled back at the end (the cache keeps committed tokens only).
        """
        depth_limit = min(len(self.branching), state.budget - 1)
        if depth_limit <= 0 or len(state.tokens) + depth_limit >= self.draft.max_length:
            return DraftTree()
        logits = self._sync(state.tokens)
        tree, slots = DraftTree(), {}
        frontier = [(-1, logits)]
        for depth in range(depth_limit):
            level = []
            for parent, row in frontier:
                for token, q in self._children(row, self.branching[depth], state):
                    level.append(tree.add(token, parent, q))
            if depth == depth_limit - 1 or not self._room(state, len(slots) + len(level)):
                break
            out = self._run_nodes(tree, level, slots, len(state.tokens))
            frontier = list(zip(level, out, strict=True))
        self.draft.rollback(len(slots))
        return tree

    def _room(self, state: DraftState, slots: int) -> bool:
        return len(state.tokens) + slots < self.draft.max_length

    def _run_nodes(
        self, tree: DraftTree, nodes: list[int], slots: dict[int, int], root_position: int
    ) -> torch.Tensor:
        """One draft pass over tree ``nodes`` whose ancestors are in the cache already.

        ``slots`` maps each node run so far to its place among the tree's cache
        slots (after the committed tokens); the mask covers all of them.
        """
        for node in nodes:
            slots[node] = len(slots)
        mask = torch.zeros(len(nodes), len(slots), dtype=torch.bool)
        for row, node in enumerate(nodes):
            for a in tree.path_to(node):  # the node and its ancestors
                mask[row, slots[a]] = True
        depths = tree.depths
        tokens = [tree.tokens[n] for n in nodes]
        return self.draft.forward(
            tokens, [root_position + depths[n] for n in nodes], attn_mask=mask
        )

    def _propose_dynamic(self, state: DraftState) -> DraftTree:
        """A tree grown by path probability and sized for this hardware (EAGLE-2; DySpec).

        Depth by depth, the ``width`` most probable nodes of the newest level (by
        the drafter's path probability, the product of its probabilities along
        the path) are expanded with one draft pass, each into its ``width`` most
        probable children. Drafting stops at ``max_depth`` or when the budget
        policy (`TreeBudget`) says another level would not raise the expected
        tokens per second; then the most probable nodes are kept, as many as
        maximise expected tokens per second under the measured pass costs.
        Children are the drafter's top tokens (deterministic), which every
        verifier treats as point masses: lossless under greedy and sampling.
        Deviation from EAGLE-2: its tree size is a fixed top-N; here N and the
        depth come from the cost curves and an online calibration of the
        drafter's confidence.
        """
        budget, width = self.tree_budget, self.width
        depth_limit = min(self.max_depth, state.budget - 1)
        if depth_limit <= 0 or not self._room(state, 1):
            return DraftTree()
        logits = self._sync(state.tokens)
        spent = budget.draft_ms(1)
        tree, slots, logp = DraftTree(), {}, []
        level, spread = [(-1, logits, 0.0)], []
        for depth in range(depth_limit):
            new = []
            for parent, row, base in level:
                probs = self._confidence(row, state)
                top = torch.topk(probs, min(width, probs.shape[-1]))
                spread.append(float(top.values.sum()))
                for p, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    if p <= 0.0:
                        break
                    new.append(tree.add(token, parent, None))
                    logp.append(base + math.log(p))
            if depth == depth_limit - 1 or not new:
                break
            expand = sorted(new, key=lambda i: -logp[i])[:width]
            probs = sorted((math.exp(x) for x in logp), reverse=True)
            mass = [math.exp(logp[i]) for i in expand]
            if not self._room(state, len(slots) + len(expand)) or not budget.worth_expanding(
                probs, spent, mass, sum(spread) / len(spread)
            ):
                break
            out = self._run_nodes(tree, expand, slots, len(state.tokens))
            spent += budget.draft_ms(len(expand))
            level = [(i, out[r], logp[i]) for r, i in enumerate(expand)]
        self.draft.rollback(len(slots))
        order = sorted(range(len(tree)), key=lambda i: (-logp[i], i))  # parents before children
        size, _ = budget.best_size([math.exp(logp[i]) for i in order], spent)
        self._predicted = sum(math.exp(logp[i]) for i in order[:size])
        return tree.subtree(sorted(order[:size]))

    def _confidence(self, logits: torch.Tensor, state: DraftState) -> torch.Tensor:
        """The drafter's distribution over the target's vocabulary (temperature 1 if greedy)."""
        logits = logits[: self.vocab_size].float()
        if state.sampling.greedy:
            return logits.softmax(-1)
        return self._q(logits, state)

    def observe(self, state: DraftState, tree: DraftTree, outcome: Outcome) -> None:
        self.policy.observe(len(tree), len(outcome.path))
        if self.tree_budget is not None and len(tree):
            self.tree_budget.observe(self._predicted, len(outcome.path))
