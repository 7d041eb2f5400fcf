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

import copy
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from specdec.errors import InvalidRequestError
from specdec.models.eagle_head import EagleHead, head_folder, load_head
from specdec.models.target import NativeTarget
from specdec.models.transformer import Transformer, attention_mask
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
    version: str = option(
        "auto",
        "1 (EAGLE-1: the target's last hidden state) or 3 (EAGLE-3: three layers' states "
        "fused, a norm and LM head of its own); auto: 3 when the model has such a head",
        parse=one_of("auto", "1", "3"),
    )
    head: str | None = option(
        None,
        "the head's folder (ours, or a speculators EAGLE-3 checkpoint); default: the one "
        "`specdec train eagle --model MODEL [--version 3]` made",
        parse=optional_str,
    )
    head_quant: str = option(
        "auto",
        "the head's linears: int8 or int4 (the native kernel), none (float); auto: int4 "
        "when the target's linears are quantised, else none",
        parse=one_of("auto", "int8", "int4", "none"),
    )


class HeadDraft(NativeTarget):
    """An EAGLE head on its target, as a draft `Target`: one decoder layer that shares the
    target's embedding (and, version 1, its final norm and LM head), and whose every input
    row carries a feature: the committed one (`add_features`, from the target's hidden
    states) for a committed token, the head's own output at the row's parent for a drafted
    one (the slot before it in a causal pass, or ``parents`` given for a tree pass).
    Logits are -inf outside the draft vocabulary. ``quant``: the head's linears through
    the native kernel (int8/int4; version 1's layer in one native call) or float."""

    def __init__(self, head: EagleHead, target: Transformer, quant: str = "none") -> None:
        head.check_target(target)
        cfg = head.config.layer
        dtype = target.dtype
        head = copy.deepcopy(head).to(dtype).requires_grad_(False)
        self.head, self.version = head, head.version
        self.feature_layers = head.config.feature_layers
        model = Transformer(replace(cfg, vocab_size=1, tie_word_embeddings=False)).to(dtype)
        model.config = cfg
        model.layers = torch.nn.ModuleList([head.layer])  # the head's own layer, shared
        model.embed = target.embed
        if self.version == 1:
            model.norm, model.lm_head = target.norm, target.lm_head
        else:
            model.norm, model.lm_head = head.norm, head.lm_head
        if quant in ("int8", "int4"):
            from specdec.models.quant_linear import (
                QuantLinear,
                attach_native_layers,
                float_parts,
                quantise_linears,
            )

            def packed(name: str):  # version 1's LM head is the target's, as it is
                if name == "lm_head" and self.version == 1:
                    return None
                return float_parts(model.get_submodule(name).weight.float(), quant)

            quantise_linears(model, packed)
            if self.version == 3:
                head.lm_head = model.lm_head
            head.fc = QuantLinear(float_parts(head.fc.weight.float(), quant), head.fc.bias)
            if self.version == 1:  # version 3's attention reads 2·hidden: no one-call kernel
                attach_native_layers(model)
        super().__init__(model, capacity=256)  # its cache: up to the target's context
        self.target, self.config = target, target.config
        self.vocab = target.config.vocab_size
        self.rows = head.d2t.clone()
        if self.version == 1 and hasattr(target.lm_head, "rows"):
            target.lm_head.rows(self.rows)  # a quantised head's subset: built once, now
        d = cfg.hidden_size
        self.real = torch.zeros(0, d, dtype=dtype)  # committed features by position
        self.n_real = 0
        self.out = torch.zeros(0, d, dtype=dtype)  # the head's output features by slot
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
        """The target's hidden states at `feature_layers` at the next positions."""
        n = hidden.shape[0]
        self.real = self._grown(self.real, self.n_real + n)
        rows = self.head.committed_features(self.target, hidden.to(self.real.dtype))
        self.real[self.n_real : self.n_real + n] = rows
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
        p = torch.as_tensor(positions, dtype=torch.long)
        embeds = self.model.embed(t).to(feats.dtype)
        if self.version == 1:
            x = self.head.fc(torch.cat([embeds, feats], dim=-1))
            part, hidden = self.model(
                t,
                p,
                self.cache,
                attn_mask=attn_mask,
                logits_rows=logits_rows,
                vocab_rows=self.rows,
                return_hidden=True,
                embeds=x,
            )
        else:
            hidden = self._layer_pass(embeds, feats, p, attn_mask)
            rows = hidden if logits_rows is None else hidden[logits_rows]
            part = self.head.logits(self.target, rows, None)
            if part.dtype in (torch.bfloat16, torch.float16):
                part = part.float()
        self.out = self._grown(self.out, start + n)
        self.out[start : start + n] = self.head.next_features(self.target, hidden)
        logits = torch.full((part.shape[0], self.vocab), float("-inf"), dtype=part.dtype)
        logits[:, self.rows] = part
        return logits

    def _layer_pass(self, embeds, feats, positions, attn_mask) -> torch.Tensor:
        """Version 3's layer over new rows, appending them to the head's cache."""
        n = embeds.shape[0]
        start = self.cache.begin_write(n)
        mask = attention_mask(attn_mask, start, n, embeds.device)
        cos, sin = self.model.rope().lookup(positions, embeds.dtype)
        block = self.head.layer
        a, h = self.head.layer_input(embeds, feats)
        h = h + block.attn(a, cos, sin, self.cache, 0, start, mask)
        return h + block.ffn(block.ffn_norm(h))


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
        folder = Path(o.head) if o.head else default_head(ctx.model or "model", o.version)
        if not o.head and not folder.exists():
            flag = " --version 3" if o.version == "3" else ""
            raise InvalidRequestError(
                f"no EAGLE head for {ctx.model or 'this model'}: train one with "
                f"`specdec train eagle --model {ctx.model or 'MODEL'}{flag}` (or give "
                "head=FOLDER)"
            )
        head = load_head(folder)
        if o.version != "auto" and head.version != int(o.version):
            raise InvalidRequestError(
                f"{folder} holds an EAGLE-{head.version} head, not version {o.version}"
            )
        quant = o.head_quant
        if quant == "auto":
            quant = "int4" if target.model.native_layers is not None else "none"
        draft = HeadDraft(head, target.model, quant)

        def cost():
            return head_pass_cost(draft, folder, quant, ctx)

        return cls(draft, ctx.vocab_size, **shape_arguments(ctx, o, cost))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.draft.feature_layers

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


def default_head(model: str, version: str = "auto") -> Path:
    """The head `specdec train eagle` made for ``model``: version 3's when asked for, or
    when ``auto`` and one exists; else version 1's."""
    three = head_folder(model, "eagle3")
    if version == "3" or (version == "auto" and three.exists()):
        return three
    return head_folder(model, "eagle")


def head_pass_cost(draft: HeadDraft, folder: Path, quant: str, ctx: BuildContext):
    """The head's pass-cost curve, measured once per head file, format and machine."""
    from specdec.models.pass_cost import cached_pass_cost, measure_pass_cost

    stamp = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        st = weights.stat()
        stamp.update(f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    identity = f"eagle head|{stamp.hexdigest()[:16]}|{quant}|{ctx.identity}"
    draft.measuring = True
    try:
        if not ctx.identity:  # a target known by no name (tests): measured, not kept
            return measure_pass_cost(draft, budget_s=2.0)
        return cached_pass_cost(draft, identity, progress=ctx.progress)
    finally:
        draft.measuring = False
        draft.reset()
