"""Medusa (Cai et al. 2024): heads on the target's last hidden state guess the next
tokens all at once, and a static tree of their top guesses is verified in one pass.

Each step the heads (`specdec.models.medusa_heads`) read the target's state at the last
committed position, whose own logits gave the pending token (the tree's root): head k
guesses the token k + 1 places after the root. The tree is Medusa's: the paths
(i_1, ..., i_d) of the heads' i-th likeliest tokens (i_1 from head 1, i_2 from head 2,
...) whose product of measured accuracies (head k's (i+1)-th guess was right that often,
held out, recorded when the heads were trained) is highest, best first, as the paper
builds its sparse tree; how many of them pays is chosen on the target's pass-cost curve
(the tree's expected tokens per millisecond of verifying and drafting), or given.

Drafts are deterministic (the top guesses), so every lossless verifier takes them
(greedy; speculative sampling treats each node as a point mass). ``acceptance=typical``
verifies sampled steps with Medusa's typical acceptance instead: LOSSY, opt-in, never
chosen by auto (`specdec.speculation.verifiers.typical`). Medusa-2's joint training of
the target is not here: it changes the target.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import head_folder
from specdec.models.medusa_heads import MedusaHeads
from specdec.models.target import NativeTarget
from specdec.models.transformer import Transformer, head_logits
from specdec.speculation.drafters.base import BuildContext, Drafter, DraftState
from specdec.speculation.options import Options, one_of, option, optional_str
from specdec.speculation.sampling import SamplingParams
from specdec.speculation.sizing import best_size
from specdec.speculation.tree import DraftTree
from specdec.speculation.verifiers.base import Verifier
from specdec.speculation.verifiers.typical import TypicalVerifier

# nodes of the tree when no pass costs are measured (the paper's trees have 64 on a GPU)
DEFAULT_NODES = 16


@dataclass(frozen=True)
class MedusaOptions(Options):
    method: ClassVar[str] = "medusa"
    heads: str | None = option(
        None,
        "the heads' folder; default: the one `specdec train medusa --model MODEL` made",
        parse=optional_str,
    )
    top_k: int = option(8, "most guesses of each head the tree may use", minimum=1)
    max_nodes: int = option(
        64, "most tree nodes: the pass-cost curve sizes the tree below it", minimum=1
    )
    head_quant: str = option(
        "auto",
        "the heads' residual blocks: int8 (the native kernel) or none (float); auto: int8 "
        "when the target's linears are quantised",
        parse=one_of("auto", "int8", "none"),
    )
    acceptance: str = option(
        "lossless",
        "under sampling: the engine's lossless verifier, or Medusa's typical acceptance "
        "(LOSSY: a drafted token passes when the target's probability of it exceeds "
        "min(epsilon, delta * exp(-entropy)); greedy output is unchanged)",
        parse=one_of("lossless", "typical"),
    )
    epsilon: float = option(0.09, "typical acceptance: the hard threshold", minimum=1e-9)
    delta: float = option(0.3, "typical acceptance: the entropy-scaled threshold", minimum=1e-9)

    def check(self) -> None:
        if self.epsilon > 1 or self.delta > 1:
            raise InvalidRequestError("medusa: epsilon and delta must be at most 1")

    @property
    def lossless(self) -> bool:
        return self.acceptance == "lossless"


def medusa_tree(accuracy: list[list[float]], max_nodes: int) -> tuple[list[tuple], list[float]]:
    """The ``max_nodes`` paths of guesses (a path (i_1, ..., i_d): head k's i_k-th
    likeliest token at depth k) with the highest products of accuracies, best first,
    and those products. A child's product never exceeds its parent's, and it is pushed
    only once its parent is taken, so every prefix of the list is a tree."""
    heads = len(accuracy)
    paths: list[tuple] = []
    scores: list[float] = []
    frontier = [(-a, (i,)) for i, a in enumerate(accuracy[0])] if heads else []
    heapq.heapify(frontier)
    while frontier and len(paths) < max_nodes:
        neg, path = heapq.heappop(frontier)
        paths.append(path)
        scores.append(-neg)
        if len(path) < heads:
            for i, a in enumerate(accuracy[len(path)]):
                heapq.heappush(frontier, (neg * a, (*path, i)))
    return paths, scores


def int8_linears(module: torch.nn.Module, skip: str | None = None) -> None:
    """Every ``nn.Linear`` of ``module`` (but those under ``skip``) as an int8 `QuantLinear`
    (the native kernel): a head's linears beside a quantised target."""
    from specdec.models.quant_linear import QuantLinear, float_parts

    for name, lin in list(module.named_modules()):
        if isinstance(lin, torch.nn.Linear) and not (skip and name.startswith(skip + ".")):
            parent, _, attr = name.rpartition(".")
            quantised = QuantLinear(float_parts(lin.weight.float(), "int8"), lin.bias)
            setattr(module.get_submodule(parent), attr, quantised)


def prior_accuracy(heads: int, top_k: int) -> list[list[float]]:
    """Accuracies assumed for heads that record none (untrained, made in tests): falling
    with the depth and the rank, as measured ones do."""
    return [[0.6 ** (k + 1) / (i + 1) for i in range(top_k)] for k in range(heads)]


class MedusaDrafter(Drafter):
    name = "medusa"
    lossy_with = "acceptance=typical, under sampling"
    runs_a_model = True
    description = (
        "Medusa-1 heads (residual blocks on the target's last hidden state, trained here "
        "with `specdec train medusa`) guess the next tokens at once; a static tree of their "
        "top guesses, chosen by their measured accuracies (Cai et al. 2024)"
    )
    Options = MedusaOptions
    heads_class: ClassVar[type] = MedusaHeads  # what `build` loads from the heads' folder

    def __init__(
        self,
        heads: MedusaHeads,
        target: Transformer,
        *,
        top_k: int = 8,
        max_nodes: int = 64,
        pass_cost=None,
        quant: str = "none",
        typical: TypicalVerifier | None = None,
    ) -> None:
        """``typical``: the verifier of sampled steps (None: the engine's lossless one)."""
        heads.check_target(target)
        self.heads = heads.to(target.dtype).requires_grad_(False)
        if quant == "int8":
            int8_linears(self.heads)
        self.plan(heads, target, top_k, max_nodes, pass_cost, typical)
        self.last: torch.Tensor | None = None  # the target's state at the last committed row

    def plan(self, heads, target: Transformer, top_k, max_nodes, pass_cost, typical) -> None:
        """The static tree from ``heads``' recorded accuracies (shared with Hydra)."""
        self.target = target
        self.typical = typical
        self.rows = heads.d2t.clone()
        if hasattr(target.lm_head, "rows"):
            target.lm_head.rows(self.rows)  # a quantised head's subset: built once, now
        k = min(top_k, len(self.rows))
        accuracy = [row[:k] for row in heads.config.accuracy[: heads.num_heads]]
        if len(accuracy) < heads.num_heads or any(len(row) < k for row in accuracy):
            accuracy = prior_accuracy(heads.num_heads, k)
        self.top_k = k
        self.paths, self.scores = medusa_tree(accuracy, max_nodes)
        self.pass_cost = pass_cost
        self.draft_ms = 0.0  # what a step's guessing costs, smoothed
        self.timings = 0
        self.size = self._size()
        self._tree: DraftTree | None = None
        self._nodes: list[int] = []  # the drafted tree's nodes, as indices of self.paths

    @classmethod
    def build(cls, ctx: BuildContext, options: MedusaOptions) -> MedusaDrafter:
        o = options
        target = ctx.target
        label = cls.heads_class.config_class.label
        if not isinstance(target, NativeTarget):
            raise InvalidRequestError(
                f"method {cls.name!r} reads the target's hidden states: it needs the native "
                "backend (--backend torch)"
            )
        folder = Path(o.heads) if o.heads else head_folder(ctx.model or "model", cls.name)
        if not o.heads and not folder.exists():
            raise InvalidRequestError(
                f"no {label} heads for {ctx.model or 'this model'}: train them with "
                f"`specdec train {cls.name} --model {ctx.model or 'MODEL'}` (or give "
                "heads=FOLDER)"
            )
        heads = cls.heads_class.load(folder)
        quant = o.head_quant
        if quant == "auto":
            quant = "int8" if target.model.native_layers is not None else "none"
        return cls(
            heads,
            target.model,
            top_k=o.top_k,
            max_nodes=o.max_nodes,
            pass_cost=ctx.pass_cost() if ctx.pass_cost is not None else None,
            quant=quant,
            typical=TypicalVerifier(o.epsilon, o.delta) if o.acceptance == "typical" else None,
        )

    def _size(self) -> int:
        """How many of the tree's paths pay: all up to DEFAULT_NODES without pass costs.
        Guessing costs its time only when it guesses: the best tree, charged it, must beat
        not guessing at all, or none is drafted."""
        if self.pass_cost is None:
            return min(len(self.paths), DEFAULT_NODES)
        ms = self.draft_ms
        n = best_size(self.scores, lambda k: self.pass_cost(k) + ms)
        gain = (1 + sum(self.scores[:n])) / (self.pass_cost(n + 1) + ms)
        return n if n and gain > 1 / self.pass_cost(1) else 0

    # ------------------------------------------------------------------ a request
    @property
    def feature_layers(self) -> tuple[int, ...]:
        return (self.target.config.num_layers,)

    def reset(self, prompt_ids: list[int]) -> None:
        self.last = None

    def observe_features(self, hidden: torch.Tensor) -> None:
        if hidden.shape[0]:
            self.last = hidden[-1:]

    def propose(self, state: DraftState) -> DraftTree:
        n = min(self.size, len(self.paths))
        depth = min(self.heads.num_heads, state.budget - 1)
        if self.last is None or n == 0 or depth < 1:
            self._tree, self._nodes = DraftTree(), []
            return self._tree
        t = time.perf_counter()
        with torch.inference_mode():
            h = self.heads(self.target, self.last)[0, :depth]
            logits = head_logits(self.target.lm_head, h.to(self.target.dtype), self.rows)
            guesses = self.rows[logits.float().topk(self.top_k, dim=-1).indices].tolist()
        tree, index = DraftTree(), {(): -1}
        nodes = []
        for p, path in enumerate(self.paths[:n]):
            if len(path) > depth or len(tree) >= state.budget - 1 or path[:-1] not in index:
                continue
            index[path] = tree.add(guesses[len(path) - 1][path[-1]], index[path[:-1]])
            nodes.append(p)
        self.timed(t)
        self._tree, self._nodes = tree, nodes
        return tree

    def chosen_paths(self, n: int, depth: int, budget: int) -> list[int]:
        """Of the tree's first ``n`` paths, those within ``depth`` and the budget whose
        parents are kept (indices into ``self.paths``): what a depth-by-depth drafter drafts."""
        chosen, kept = [], {()}
        for p, path in enumerate(self.paths[:n]):
            if len(path) <= depth and len(chosen) < budget - 1 and path[:-1] in kept:
                chosen.append(p)
                kept.add(path)
        return chosen

    def drafted(self, chosen: list[int], token: dict, start: float) -> DraftTree:
        """The tree of the ``chosen`` paths with each path's last ``token``, guessing begun
        at ``start``: timed, and kept for the step's verification."""
        tree, index = DraftTree(), {(): -1}
        for p in chosen:
            path = self.paths[p]
            index[path] = tree.add(token[path], index[path[:-1]])
        self.timed(start)
        self._tree, self._nodes = tree, chosen
        return tree

    def timed(self, start: float) -> None:
        """A step's guessing began at ``start`` (perf_counter) and is over: from the second
        on (the first pays for warm-up), the tree is sized again on the smoothed time."""
        ms = (time.perf_counter() - start) * 1e3
        self.timings += 1
        if self.timings == 1:
            return
        self.draft_ms = ms if self.timings == 2 else 0.9 * self.draft_ms + 0.1 * ms
        self.size = self._size()

    def verifier(self, sampling: SamplingParams) -> Verifier | None:
        return None if sampling.greedy else self.typical

    def node_scores(self) -> list[float] | None:
        return [self.scores[p] for p in self._nodes]

    def keep_only(self, nodes: list[int]) -> None:
        self._nodes = [self._nodes[i] for i in nodes]
