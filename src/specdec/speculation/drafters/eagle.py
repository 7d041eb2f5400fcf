"""EAGLE (Li et al. 2024): a one-layer head drafts on the target's own hidden states.

The head (`specdec.models.eagle_head`) reads, beside each token, the target's feature
after the token before it, so it sees what the target computed, not just the text:
EAGLE's point, and why a head of one layer drafts as well as a draft model of many.
Drafting runs the head autoregressively on its own predicted features; the target
verifies, and the features of what it kept replace the predicted ones: a drafted slot
of the head's cache is always rolled back, and the committed tokens are run again with
the target's features at the next step (as the authors' code does).

Everything about the shape of a draft (chain, static tree, EAGLE-2's dynamic tree sized
by the measured pass costs, sampling of siblings, adaptive length) is the draft model's
(`DraftModelDrafter`): the head stands in for the draft model as a `Target` whose inputs
carry features (`HeadDraft`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import EagleHead, head_folder
from specdec.models.target import NativeTarget
from specdec.models.transformer import Transformer
from specdec.speculation.drafters.base import BuildContext, DraftState
from specdec.speculation.drafters.draft_model import (
    DraftingOptions,
    DraftModelDrafter,
    shape_arguments,
)
from specdec.speculation.options import one_of, option, optional_str
from specdec.speculation.tree import DraftTree


@dataclass(frozen=True)
class EagleOptions(DraftingOptions):
    method: ClassVar[str] = "eagle"
    tree: str | None = option(
        "dynamic",
        "'dynamic' (EAGLE-2: grown by the head's path probability, sized by the measured "
        "pass costs), a static shape (children per node at each depth, e.g. 3,2,1), or "
        "none: a chain of num_draft_tokens",
        parse=optional_str,
    )
    head: str | None = option(
        None,
        "the head's folder; default: the one `specdec train eagle --model MODEL` made",
        parse=optional_str,
    )
    head_quant: str = option(
        "auto",
        "the head's linears: int8 or int4 (the native kernel), none (float); auto: int4 "
        "when the target's linears are quantised, else none",
        parse=one_of("auto", "int8", "int4", "none"),
    )


class HeadDraft(NativeTarget):
    """An EAGLE head on its target, as a draft `Target`: a one-layer `Transformer` that
    shares the target's embedding, final norm and LM head, and whose every input row
    carries a feature: the target's (`add_features`) for a committed token, the head's own
    output at the row's parent for a drafted one (the slot before it in a causal pass,
    or ``parents`` given for a tree pass). Logits are -inf outside the draft vocabulary."""

    def __init__(self, head: EagleHead, target: Transformer, quant: str = "none") -> None:
        head.check_target(target)
        cfg = head.config.layer
        dtype = target.dtype
        model = Transformer(replace(cfg, vocab_size=1, tie_word_embeddings=False))
        model.layers[0].load_state_dict(head.layer.state_dict())
        model = model.to(dtype)
        model.config = cfg
        model.embed, model.norm, model.lm_head = target.embed, target.norm, target.lm_head
        fc = torch.nn.Linear(head.fc.in_features, head.fc.out_features, dtype=dtype)
        fc.load_state_dict(head.fc.state_dict())
        fc.requires_grad_(False)
        if quant in ("int8", "int4"):
            from specdec.models.quant_linear import (
                QuantLinear,
                attach_native_layers,
                float_parts,
                quantise_linears,
            )

            def packed(name: str):  # the layer's own linears; the LM head is the target's
                if name == "lm_head":
                    return None
                return float_parts(model.get_submodule(name).weight.float(), quant)

            quantise_linears(model, packed)
            fc = QuantLinear(float_parts(fc.weight.float(), quant), fc.bias)
            attach_native_layers(model)
        super().__init__(model, capacity=256)  # its cache: up to the target's context
        self.fc, self.config = fc, target.config
        self.vocab = target.config.vocab_size
        self.rows = head.d2t.clone()
        if hasattr(target.lm_head, "rows"):  # a quantised head's subset: built once, now
            target.lm_head.rows(self.rows)
        d = cfg.hidden_size
        self.real = torch.zeros(0, d, dtype=dtype)  # the target's normed features by position
        self.n_real = 0
        self.out = torch.zeros(0, d, dtype=dtype)  # the head's normed outputs by slot
        self.parents: list[int] | None = None  # the next pass's rows' parent slots (a tree)
        self.measuring = False  # a cost measurement: missing features are zeros

    def reset(self) -> None:
        super().reset()
        self.n_real = 0

    def keep(self, indices: list[int]) -> None:
        raise NotImplementedError("a head's tree slots are rolled back, never kept")

    @staticmethod
    def _grown(buf: torch.Tensor, need: int) -> torch.Tensor:
        if need <= buf.shape[0]:
            return buf
        new = buf.new_zeros(max(need, 2 * buf.shape[0], 256), buf.shape[1])
        new[: buf.shape[0]] = buf
        return new

    @torch.inference_mode()
    def add_features(self, hidden: torch.Tensor) -> None:
        """The target's hidden states (before its final norm) at the next positions."""
        n = hidden.shape[0]
        self.real = self._grown(self.real, self.n_real + n)
        self.real[self.n_real : self.n_real + n] = self.model.norm(hidden.to(self.real.dtype))
        self.n_real += n

    def _feature(self, i: int, slot: int, position: int) -> torch.Tensor:
        if self.parents is not None:
            return self.out[self.parents[i]]
        if position - 1 < self.n_real:
            return (
                self.real[position - 1] if position > 0 else self.real.new_zeros(self.real.shape[1])
            )
        if i == 0 and slot > 0:  # a drafted token: the head's own output before it
            return self.out[slot - 1]
        if self.measuring:
            return self.real.new_zeros(self.real.shape[1])
        raise RuntimeError(f"no feature for position {position}: the target's are missing")

    @torch.inference_mode()
    def forward(self, tokens, positions=None, attn_mask=None, logits_rows=None):
        start, n = self.cache.length, len(tokens)
        if positions is None:
            positions = range(start, start + n)
        positions = list(positions)
        feats = torch.stack([self._feature(i, start + i, p) for i, p in enumerate(positions)]).to(
            self.real.dtype
        )
        self.parents = None
        t = torch.as_tensor(tokens, dtype=torch.long)
        x = self.fc(torch.cat([self.model.embed(t).to(feats.dtype), feats], dim=-1))
        part, hidden = self.model(
            t,
            torch.as_tensor(positions, dtype=torch.long),
            self.cache,
            attn_mask=attn_mask,
            logits_rows=logits_rows,
            vocab_rows=self.rows,
            return_hidden=True,
            embeds=x,
        )
        self.out = self._grown(self.out, start + n)
        self.out[start : start + n] = self.model.norm(hidden)
        logits = torch.full((part.shape[0], self.vocab), float("-inf"), dtype=part.dtype)
        logits[:, self.rows] = part
        return logits


class EagleDrafter(DraftModelDrafter):
    name = "eagle"
    runs_a_model = True
    description = (
        "an EAGLE head (one decoder layer on the target's hidden states, trained here with "
        "`specdec train eagle`) drafts a chain or a tree, static or dynamic as in EAGLE-2 "
        "(Li et al. 2024)"
    )
    Options = EagleOptions

    @classmethod
    def build(cls, ctx: BuildContext, options: EagleOptions) -> EagleDrafter:
        o = options
        target = ctx.target
        if not isinstance(target, NativeTarget):
            raise InvalidRequestError(
                "method 'eagle' reads the target's hidden states: it needs the native backend "
                "(--backend torch)"
            )
        folder = Path(o.head) if o.head else head_folder(ctx.model or "model")
        if not o.head and not folder.exists():
            raise InvalidRequestError(
                f"no EAGLE head for {ctx.model or 'this model'}: train one with "
                f"`specdec train eagle --model {ctx.model or 'MODEL'}` (or give head=FOLDER)"
            )
        head = EagleHead.load(folder)
        quant = o.head_quant
        if quant == "auto":
            quant = "int4" if target.model.native_layers is not None else "none"
        draft = HeadDraft(head, target.model, quant)

        def cost():
            return head_pass_cost(draft, folder, quant, ctx)

        return cls(draft, ctx.vocab_size, **shape_arguments(ctx, o, cost))

    @property
    def needs_features(self) -> bool:
        return True

    def observe_features(self, hidden: torch.Tensor) -> None:
        self.draft.add_features(hidden)

    def propose(self, state: DraftState) -> DraftTree:
        tree = super().propose(state)
        # a chain's drafted slots hold predicted features: run again with the target's
        extra = len(self.seen) - len(state.tokens)
        if extra > 0:
            self.draft.rollback(extra)
            del self.seen[len(state.tokens) :]
        return tree

    def _run_nodes(self, tree, nodes, slots, root_position):
        # each node reads its parent's output: the root's slot is the last committed one
        self.draft.parents = [
            root_position - 1 if tree.parents[n] < 0 else root_position + slots[tree.parents[n]]
            for n in nodes
        ]
        return super()._run_nodes(tree, nodes, slots, root_position)


def head_pass_cost(draft: HeadDraft, folder: Path, quant: str, ctx: BuildContext):
    """The head's pass-cost curve, measured once per head file, format and machine."""
    from specdec.models.pass_cost import cached_pass_cost, measure_pass_cost

    weights = folder / "head.safetensors"
    st = weights.stat()
    stamp = hashlib.sha256(f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    identity = f"eagle head|{stamp.hexdigest()[:16]}|{quant}|{ctx.identity}"
    draft.measuring = True
    try:
        if not ctx.identity:  # a target known by no name (tests): measured, not kept
            return measure_pass_cost(draft, budget_s=2.0)
        return cached_pass_cost(draft, identity, progress=ctx.progress)
    finally:
        draft.measuring = False
        draft.reset()
