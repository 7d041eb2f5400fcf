"""The method table: every decoding method by name, and how a request names one.

A method is one `Drafter` class, with its options and its builder beside its code;
adding one is a file, a line in `DRAFTERS` and a factory in the contract suite. A
request may also name ``A+B`` (the drafters' trees merged into one, `MergedDrafter`),
``auto`` (the drafter chosen each step by what it earns: `AutoDrafter`, its options per
model in ``auto.json``) and
``METHOD@LABEL`` (METHOD under a label of its own, so that variants run side by side).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.auto import AutoDrafter
from specdec.speculation.drafters.base import BuildContext, Drafter, NoDrafter
from specdec.speculation.drafters.chimera import ChimeraDrafter
from specdec.speculation.drafters.clover import CloverDrafter
from specdec.speculation.drafters.cross_vocab import CrossVocabDrafter
from specdec.speculation.drafters.draft_model import DraftModelDrafter
from specdec.speculation.drafters.eagle import EagleDrafter
from specdec.speculation.drafters.falcon import FalconDrafter
from specdec.speculation.drafters.hydra import HydraDrafter
from specdec.speculation.drafters.lookahead import LookaheadDrafter
from specdec.speculation.drafters.medusa import MedusaDrafter
from specdec.speculation.drafters.merged import MergedDrafter
from specdec.speculation.drafters.ngram_cache import NgramCacheDrafter
from specdec.speculation.drafters.prompt_lookup import PromptLookupDrafter
from specdec.speculation.drafters.retrieval import RetrievalDrafter
from specdec.speculation.drafters.stand import StandDrafter
from specdec.speculation.drafters.token_recycling import TokenRecyclingDrafter
from specdec.speculation.options import Options, option

DRAFTERS: tuple[type[Drafter], ...] = (
    NoDrafter,
    AutoDrafter,
    DraftModelDrafter,
    CrossVocabDrafter,
    EagleDrafter,
    MedusaDrafter,
    HydraDrafter,
    CloverDrafter,
    ChimeraDrafter,
    FalconDrafter,
    PromptLookupDrafter,
    NgramCacheDrafter,
    StandDrafter,
    LookaheadDrafter,
    RetrievalDrafter,
    TokenRecyclingDrafter,
)
METHODS: dict[str, type[Drafter]] = {d.name: d for d in DRAFTERS}


@dataclass(frozen=True)
class MergeOptions(Options):
    method: ClassVar[str] = "A+B"
    joint: bool = option(
        True,
        "cut the union of the parts' trees once more, by the chances of acceptance the parts "
        "give their nodes, to what pays on the target's pass-cost curve (else each part sizes "
        "its own tree and the union is verified whole)",
    )


@dataclass(frozen=True)
class Method:
    """A method as a request names it: one drafter, or the parts of a merge."""

    name: str
    parts: tuple[type[Drafter], ...]

    @property
    def merged(self) -> bool:
        return len(self.parts) > 1

    @property
    def description(self) -> str:
        if not self.merged:
            return self.parts[0].description
        return "one tree from several drafters: " + ", ".join(p.name for p in self.parts)

    @property
    def lossless(self) -> bool:
        """Lossless with its default options."""
        return all(p.lossless for p in self.parts)

    def lossless_with(self, given: dict[str, Any]) -> bool:
        """Lossless with options ``given`` (an option may choose a lossy verifier)."""
        return self.lossless and all(o.lossless for o in self.parse(given))

    def option_names(self) -> list[str]:
        """Every option the method takes (a merge: each part's, and ``joint``)."""
        classes = [p.Options for p in self.parts] + ([MergeOptions] if self.merged else [])
        return list(dict.fromkeys(f.name for c in classes for f in dataclasses.fields(c)))

    def parse(self, given: dict[str, Any]) -> list[Options]:
        """Each part's options from ``given`` (checked; defaults filled in), then a merge's
        own. In a merge an option goes to every part that takes it."""
        if not self.merged:
            return [self.parts[0].Options.parse(given)]
        unknown = sorted(set(given) - set(self.option_names()))
        if unknown:
            raise InvalidRequestError(
                f"method {self.name!r} takes no option {unknown[0]!r} (its options: "
                f"{', '.join(self.option_names())})"
            )
        classes = [p.Options for p in self.parts] + [MergeOptions]
        return [c.parse({k: v for k, v in given.items() if k in _fields(c)}) for c in classes]

    def effective_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Every option the method runs with, defaults included (for records); for a merge
        one dict per part, and its own under ``merge``."""
        parsed = self.parse(given)
        if not self.merged:
            return parsed[0].to_dict()
        out = {p.name: o.to_dict() for p, o in zip(self.parts, parsed, strict=False)}
        out["merge"] = parsed[-1].to_dict()
        return out

    def build(self, ctx: BuildContext, given: dict[str, Any]) -> Drafter:
        """The drafter for options ``given`` (strings or values) on ``ctx``'s target."""
        parsed = self.parse(given)
        if not self.merged:
            return self.parts[0].build(ctx, parsed[0])
        *own, merge = parsed
        drafters = [p.build(ctx, o) for p, o in zip(self.parts, own, strict=True)]
        # the union is sized jointly unless that, or sizing by cost, is turned off
        joint = merge.joint and all(getattr(o, "size_by_cost", True) for o in own)
        return MergedDrafter(drafters, pass_cost=ctx.cost_if(joint))


def _fields(options: type[Options]) -> set[str]:
    return {f.name for f in dataclasses.fields(options)}


def get_method(name: str) -> Method:
    """The method ``name`` (``auto`` and labels resolved first: `resolve`)."""
    if "+" in name:
        parts = [get_method(p.strip()) for p in name.split("+")]
        if any(p.merged or p.name in ("ar", "auto") for p in parts) or len(parts) < 2:
            raise InvalidRequestError(
                f"{name!r}: merge two or more drafting methods, e.g. pld+recycle"
            )
        # an option goes to every part that takes it: one folder cannot hold two kinds of heads
        for key in ("head", "heads"):
            takers = [p.name for p in parts if key in _fields(p.parts[0].Options)]
            if len(takers) > 1:
                raise InvalidRequestError(
                    f"{name!r}: {' and '.join(takers)} both read option {key!r}, a folder of "
                    "their own kind; merge at most one of them"
                )
        return Method(name, tuple(p.parts[0] for p in parts))
    if name not in METHODS:
        raise InvalidRequestError(
            f"unknown method {name!r} (known: {', '.join(METHODS)}; see `specdec methods`)"
        )
    return Method(name, (METHODS[name],))


def is_method(name: str) -> bool:
    """A registered method, or a valid merge of them (``pld+recycle``)."""
    try:
        get_method(name)
    except InvalidRequestError:
        return False
    return True


AUTO: dict[str, dict[str, dict[str, Any]]] = json.loads(
    (Path(__file__).with_name("auto.json")).read_text()
)["models"]


def auto_options(model: str, quant: str = "none") -> dict[str, Any]:
    """The options ``auto`` starts from for ``model`` whose linears hold ``quant``
    (resolved, not auto): its entry in ``auto.json``, else auto's defaults."""
    entry = AUTO.get(model, {}).get("float" if quant == "none" else "quantised")
    return dict(entry["options"]) if entry else {}


def base_name(name: str) -> str:
    """``draft@wide`` is method ``draft`` under the label ``wide``."""
    return name.split("@", 1)[0]


def resolve(
    name: str, options: dict[str, Any], model: str, quant: str = "none"
) -> tuple[str, dict[str, Any]]:
    """The method a request for ``name`` runs, and its options: a label is dropped; ``auto``
    takes the options ``auto.json`` gives for ``model`` with weights ``quant``, under the
    ones ``options`` gives."""
    name = base_name(name)
    if name == "auto":
        return name, {**auto_options(model, quant), **options}
    return name, dict(options)
