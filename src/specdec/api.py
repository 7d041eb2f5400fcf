"""The Python API: load a model once, generate many times, stream.

    >>> import specdec
    >>> gen = specdec.load("qwen2.5-coder-0.5b")
    >>> for piece in gen.stream("Write a haiku about caches"):
    ...     print(piece, end="")
    >>> result = gen.generate("Reverse a string in Python", max_new_tokens=64)
    >>> result.text, result.token_ids, result.stats.tau

The CLI and the HTTP server are thin layers over this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from specdec.engine import Engine, Generation
from specdec.errors import InvalidRequestError
from specdec.models.catalog import DEFAULT_MODEL
from specdec.models.loading import load_model, resolve_dtype
from specdec.models.target import NativeTarget, Target
from specdec.models.tokenizer import Tokenizer
from specdec.speculation.drafters.base import BuildContext, Drafter
from specdec.speculation.methods import get_method, resolve
from specdec.speculation.sampling import SamplingParams

Prompt = str | list[dict[str, Any]]


BACKENDS = ("native", "hf", "llamacpp")


class Generator:
    """A loaded target model, its tokenizer and the engine that decodes with it."""

    def __init__(
        self,
        target: Target,
        tokenizer: Tokenizer,
        name: str = "",
        dtype: str = "auto",
        device: str = "cpu",
        progress: bool = True,
        quant: str = "auto",
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.name = name
        self.dtype, self.device, self.quant = dtype, device, quant
        self.engine = Engine(self.target, self.tokenizer)
        self.last: Generation | None = None
        self.progress = progress  # progress bars when loading draft models
        # (draft model, weight format asked) -> the draft, its resolved format, its tokenizer
        self._drafts: dict[tuple[str, str], Target] = {}
        self._draft_quant: dict[tuple[str, str], str] = {}
        self._draft_tokenizers: dict[tuple[str, str], tuple[Tokenizer, bool]] = {}
        self._drafters: dict[tuple, Any] = {}

    @property
    def vocab_size(self) -> int:
        return self.target.config.vocab_size

    def load_draft(self, spec: str, same_tokenizer: bool = True, quant: str | None = None):
        """A draft model, loaded once per generator and weight format.

        ``same_tokenizer`` (for methods that exchange token ids with the target)
        refuses a draft with another tokenizer and returns its `Target`; False
        returns ``(target, tokenizer)`` of a draft with any tokenizer. ``quant``: the
        draft's weight format (`specdec.models.quant_linear`), default the target's.
        """
        key = (spec, quant or self.quant)
        if key not in self._drafts:
            loaded = load_model(
                spec,
                dtype=self.dtype,
                device=self.device,
                progress=self.progress,
                quant=key[1],
            )
            self._drafts[key] = NativeTarget(loaded.model)
            self._draft_quant[key] = loaded.quant
            same = loaded.tokenizer.vocab() == self.tokenizer.vocab()
            self._draft_tokenizers[key] = (loaded.tokenizer, same)
        tokenizer, same = self._draft_tokenizers[key]
        if not same_tokenizer:
            return self._drafts[key], tokenizer
        if not same:
            raise InvalidRequestError(
                f"draft model {spec!r} has another tokenizer than the target; pick a draft "
                "of the same vocabulary, or use --method cross-vocab"
            )
        return self._drafts[key]

    def pass_cost(self, refresh: bool = False):
        """The target's pass-cost curve (`specdec.models.pass_cost`): measured once per
        machine, model, dtype and device (or again with ``refresh``), then read from the
        cache."""
        from specdec.models.pass_cost import cached_pass_cost

        return cached_pass_cost(
            self.target, self.identity, progress=self.progress, refresh=refresh
        )

    @property
    def identity(self) -> str:
        """The target as measurements depend on it: model, its file, weights, device."""
        loaded = getattr(self, "loaded", None)
        source = str(loaded.source) if loaded is not None else type(self.target).__name__
        weights = (
            f"{loaded.model.dtype}|{loaded.quant}"
            if loaded is not None
            else f"{self.dtype}|{self.quant}"
        )
        return f"{self.name}|{source}|{weights}|{self.device}"

    def draft_pass_cost(self, draft_spec: str, quant: str | None = None):
        """The pass-cost curve of a draft model (the target's dtype and device; weights
        ``quant``, default the target's)."""
        from specdec.models.pass_cost import cached_pass_cost

        draft_target = self.load_draft(draft_spec, quant=quant)
        key = (draft_spec, quant or self.quant)
        weights = f"{draft_target.model.dtype}|{self._draft_quant[key]}"
        identity = f"{draft_spec}|draft|{weights}|{self.device}"
        return cached_pass_cost(draft_target, identity, progress=self.progress)

    def build_context(self) -> BuildContext:
        """What a method's builder may use (`specdec.speculation.drafters.base.BuildContext`)."""
        return BuildContext(
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            target=self.target,
            load_draft=self.load_draft,
            pass_cost=self.pass_cost,
            draft_pass_cost=self.draft_pass_cost,
            progress=self.progress,
            model=self.name,
            identity=self.identity,
        )

    @property
    def weights_quant(self) -> str:
        """What the target's linears hold (`specdec.models.quant_linear.QUANTS`, resolved)."""
        loaded = getattr(self, "loaded", None)
        return loaded.quant if loaded is not None else "none"

    def resolve(self, method: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The method a request runs and its options: ``auto`` with the options given for
        this model and its weights (`specdec.speculation.auto.json`) under the request's,
        ``METHOD@LABEL`` is METHOD."""
        return resolve(method, options, self.name, self.weights_quant)

    def drafter(self, method: str = "auto", **options: Any) -> Drafter:
        """The drafter of a method (built once per method and options)."""
        method, options = self.resolve(method, options)
        spec = get_method(method)
        key = (method, repr(spec.effective_options(options)))
        if key not in self._drafters:
            self._drafters[key] = spec.build(self.build_context(), options)
        return self._drafters[key]

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        backend: str = "native",
        progress: bool = True,
        quant: str = "auto",
    ) -> Generator:
        """`backend` "native" is specdec's runtime; "hf" runs the model through transformers
        (any architecture transformers knows, slower); "llamacpp" runs a GGUF on
        llama.cpp's own kernels (`specdec.models.llamacpp_target`). ``quant``: auto, none, gguf (the
        GGUF file's own blocks), int8 or int4 (`specdec.models.quant_linear`; auto picks
        gguf for a quantised GGUF on a CPU with AVX-512 VNNI); ``dtype`` auto is float32
        beside quantised linears, and beside float ones bfloat16 where the device computes
        it (`specdec.models.loading.resolve_dtype`), float32 elsewhere. Draft models follow the same
        settings, resolved for each file."""
        if backend == "native":
            loaded = load_model(model, dtype=dtype, device=device, progress=progress, quant=quant)
            gen = cls(
                NativeTarget(loaded.model),
                loaded.tokenizer,
                model,
                dtype,
                device,
                progress,
                quant,
            )
            gen.loaded = loaded
            return gen
        if quant not in ("auto", "none"):
            raise InvalidRequestError(f"--quant {quant} needs the native backend")
        dtype = resolve_dtype(dtype, device=device)
        if backend == "llamacpp":
            from specdec.models.catalog import resolve_model_file
            from specdec.models.llamacpp_target import LlamaCppTarget
            from specdec.models.loading import load_tokenizer

            where = resolve_model_file(str(model), auto_pull=True, progress=progress)
            if isinstance(where, str) or where.is_dir() or where.suffix != ".gguf":
                raise InvalidRequestError(
                    f"--backend llamacpp runs GGUF files; {model!r} is not one"
                )
            target = LlamaCppTarget(where)
            tokenizer = load_tokenizer(model, progress=progress)
            return cls(target, tokenizer, model, "auto", device, progress, quant)
        if backend == "hf":
            from specdec.models.hf_target import load_hf_target

            target, info = load_hf_target(model, dtype=dtype, device=device, progress=progress)
            if info.tokenizer is None:
                raise InvalidRequestError(f"{model}: no tokenizer.json beside the model")
            return cls(target, info.tokenizer, model, dtype, device, progress, quant)
        raise InvalidRequestError(
            f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})"
        )

    def prompt_ids(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        """Token ids for a prompt: a string (chat-templated unless raw) or a list of chat messages."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("empty prompt")
            if raw:
                return self.tokenizer.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        elif raw:
            raise InvalidRequestError("raw prompts must be strings, not chat messages")
        if not prompt:
            raise InvalidRequestError("empty prompt")
        return self.tokenizer.encode_chat(prompt)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: tuple[str, ...] | list[str] = (),
        raw: bool = False,
        ignore_eos: bool = False,
        method: str = "auto",
        **method_options: Any,
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; `self.last` holds the full result.

        ``method`` names a decoding method (`specdec methods`). The default, "auto",
        chooses each step among prompt lookup, the n-gram cache, draft models of the
        model's vocabulary in the cache and plain decoding, by what each has earned on
        this machine; the output is the model's own either way. Options come as keywords, e.g.
        ``method="draft", draft_model="qwen2.5-coder-0.5b", num_draft_tokens=4``.
        """
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        ids = self.prompt_ids(prompt, raw=raw)
        drafter = self.drafter(method, **method_options)
        self.last = Generation()
        yield from self.engine.stream(
            ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            drafter=drafter,
            result=self.last,
        )

    def generate(self, prompt: Prompt, **kwargs: Any) -> Generation:
        """Generate to completion; returns text, token ids and statistics."""
        for _ in self.stream(prompt, **kwargs):
            pass
        assert self.last is not None
        return self.last


def load(model: str = DEFAULT_MODEL, **kwargs: Any) -> Generator:
    """Load a model by known name, GGUF path, safetensors folder or hub id."""
    return Generator.load(model, **kwargs)
