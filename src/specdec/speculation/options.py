"""A method's options: declared once, beside the drafter that reads them.

Each drafter has a frozen dataclass of options whose fields carry a default, a help
line, a parser for values typed on a command line and a lower bound:

    @dataclass(frozen=True)
    class PromptLookupOptions(Options):
        num_draft_tokens: int = option(10, "tokens copied per match", minimum=1)

``PromptLookupOptions.parse({"num_draft_tokens": "5"})`` turns strings into values and
checks them; constructing the dataclass directly checks the same bounds (and the
cross-field rules of its ``check``), so a drafter built from Python and one built from
the command line are held to the same rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from specdec.errors import InvalidRequestError


def boolean(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


boolean.__name__ = "bool"


def one_of(*choices: str) -> Callable[[Any], str]:
    """A parser accepting one of ``choices`` (case and ``_`` / ``-`` insensitive)."""

    def parse(value: Any) -> str:
        text = str(value).strip().lower().replace("_", "-")
        if text not in choices:
            raise ValueError(value)
        return text

    parse.__name__ = "one of " + ", ".join(choices)
    return parse


def optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


optional_str.__name__ = "str"


def option(
    default: Any,
    help: str,
    *,
    parse: Callable[[Any], Any] | None = None,
    minimum: float | None = None,
) -> Any:
    """A dataclass field of an `Options` class. ``parse`` turns a typed value (a string on
    the command line) into the option's value; by default the type of ``default``."""
    if parse is None:
        parse = boolean if isinstance(default, bool) else type(default)
    return dataclasses.field(
        default=default, metadata={"help": help, "parse": parse, "minimum": minimum}
    )


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every method's options; ``method`` names the method in error messages."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, low = getattr(self, f.name), f.metadata.get("minimum")
            if low is not None and value is not None and value < low:
                raise InvalidRequestError(
                    f"option {f.name} of method {self.method!r} must be >= {low}, got {value}"
                )
        self.check()

    def check(self) -> None:
        """Rules between options (e.g. ``min_ngram <= max_ngram``); raise InvalidRequestError."""

    @property
    def lossless(self) -> bool:
        """Whether the method with these options keeps the target's distribution (a lossy
        verifier chosen by an option: False)."""
        return True

    @classmethod
    def of(cls, options: Options | None, given: dict[str, Any]) -> Options:
        """A drafter constructor's options: ``options`` (or the defaults) updated by the
        keywords ``given``, checked."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be {cls.__name__} (give the rest as keywords)")
        return dataclasses.replace(options, **given) if options is not None else cls(**given)

    @classmethod
    def parse(cls, given: dict[str, Any]) -> Options:
        """Options from ``given`` (strings or values, e.g. from ``--option KEY=VALUE``);
        unknown keys and values that do not parse are errors a user can read."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            known = ", ".join(fields) or "none"
            raise InvalidRequestError(
                f"method {cls.method!r} takes no option {unknown[0]!r} (its options: {known})"
            )
        values = {}
        for key, value in given.items():
            parse = fields[key].metadata["parse"]
            try:
                values[key] = None if value is None else parse(value)
            except (TypeError, ValueError):
                raise InvalidRequestError(
                    f"option {key} of method {cls.method!r} must be "
                    f"{getattr(parse, '__name__', 'a value')}, got {value!r}"
                ) from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> dict[str, dict[str, Any]]:
        """Each option's type name, default and help (for `specdec methods`)."""
        return {
            f.name: {
                "type": getattr(f.metadata["parse"], "__name__", "value"),
                "default": f.default,
                "help": f.metadata["help"],
            }
            for f in dataclasses.fields(cls)
        }


SIZE_BY_COST_HELP = (
    "pick the tree size that maximises expected tokens per unit of the target's measured "
    "pass time (else always max_nodes)"
)

PROMPT_ROWS_HELP = (
    "prompt tokens not yet known learnt from the prefill's logits (the LM head once per "
    "row); 0: learn only from verification passes, as in the paper"
)



def parse_assignments(items: list[str], scoped: bool = False) -> list[tuple[str, str, str]]:
    """``--option`` values as (method, key, value): ``KEY=VALUE`` (method "", for every
    method that takes KEY) or, if ``scoped``, ``METHOD.KEY=VALUE`` too. Keys may be
    written with - for _."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, key = key.rpartition(".") if scoped else ("", "", key)
        if not sep or not key or (dot and not method):
            form = "[METHOD.]KEY=VALUE" if scoped else "KEY=VALUE"
            raise InvalidRequestError(f"--option takes {form}, got {item!r}")
        out.append((method, key.replace("-", "_"), value))
    return out
