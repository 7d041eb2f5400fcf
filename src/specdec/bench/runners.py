"""What the harness runs on one prompt: specdec's own methods, and peers beside them.

A runner turns (chat messages, their token ids, a token budget) into a `TurnOutput`, with
the wall time measured around generation only. Every runner on a local model receives
the same chat-templated token ids; a server receives the messages.

- `SpecdecRunner`: a method of `specdec.speculation.methods.METHODS` (or ``auto``) through the
  engine; time, τ, drafted and accepted come from the engine's own statistics.
- `HFRunner`: ``transformers`` ``generate`` on the same model files — ``hf-ar`` (plain
  greedy), ``hf-assisted`` (assisted generation with the same draft model), ``hf-pld``
  (prompt lookup, ``prompt_lookup_num_tokens=10``). Target passes are counted with a hook.
- `LlamaCppRunner`: ``llama-cpp-python`` on the same GGUF file — ``llamacpp-ar`` and
  ``llamacpp-pld`` (its prompt-lookup drafter, 10 tokens); optional.
- `ServerRunner`: any OpenAI-compatible chat-completions endpoint (``--server URL``);
  tokens counted from the ``usage`` field.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import torch

from specdec.errors import InvalidRequestError, RegistryUnreachableError, SpecdecError

PEERS = ("hf-ar", "hf-assisted", "hf-pld", "llamacpp-ar", "llamacpp-pld")
PLD_TOKENS = 10


class ServerError(SpecdecError):
    """The benchmarked server cannot be reached or answers something unusable."""


@dataclass
class TurnOutput:
    text: str
    token_ids: list[int] | None  # None where the runner cannot see them (a server)
    new_tokens: int
    prompt_tokens: int
    wall_s: float
    target_passes: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    finish_reason: str | None = None
    draft_s: float | None = None  # time in the drafter (specdec methods)
    prefill_s: float | None = None  # time of the prompt's pass (specdec methods)
    pass_sizes: dict[int, int] | None = None  # tokens in one pass -> passes of that size
    drafters: dict[str, dict] | None = None  # auto: what each drafter it ran did


class Runner:
    name: str = ""
    kind: str = ""  # "specdec", "peer" or "server"
    lossless: bool = True  # greedy output should equal the target's greedy output

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "lossless": self.lossless}

    def run(
        self,
        messages: list[dict[str, str]],
        ids: list[int] | None,
        budget: int,
        temperature: float,
        seed: int,
    ) -> TurnOutput:
        raise NotImplementedError

    def _output(self, new: list[int], ids: list[int], wall: float, finish: str) -> TurnOutput:
        """A peer's turn: its new token ids decoded with the target's tokenizer, its passes."""
        return TurnOutput(
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            token_ids=new,
            new_tokens=len(new),
            prompt_tokens=len(ids),
            wall_s=wall,
            target_passes=self.passes,
            finish_reason=finish,
        )


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- specdec
class SpecdecRunner(Runner):
    kind = "specdec"

    def __init__(self, gen: Any, method: str, options: dict[str, Any]) -> None:
        from specdec.speculation.methods import base_name, get_method

        # ``method`` may be a labelled variant, ``draft@wide``: the label names the results
        self.gen, self.name, self.options = gen, method, options
        self.method = base_name(method)
        self.resolved, given = gen.resolve(self.method, options)
        spec = get_method(self.resolved)
        self.lossless = spec.lossless_with(given)
        # every option with its value, defaults included (per part for a merge)
        self.validated = spec.effective_options(given)
        gen.drafter(self.method, **options)  # build (and load any draft model) before timing

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(resolved=self.resolved, options=self.validated)
        return d

    def run(self, messages, ids, budget, temperature, seed):
        res = self.gen.generate(
            messages,
            max_new_tokens=budget,
            temperature=temperature,
            seed=seed if temperature > 0 else None,
            method=self.method,
            **self.options,
        )
        s = res.stats
        return TurnOutput(
            text=res.text,
            token_ids=list(res.token_ids),
            new_tokens=s.new_tokens,
            prompt_tokens=s.prompt_tokens,
            wall_s=s.wall_s,  # prefill and decoding, as the engine clocks them
            target_passes=s.target_passes,
            drafted=s.drafted,
            accepted=s.accepted,
            finish_reason=res.finish_reason,
            draft_s=s.draft_s,
            prefill_s=s.prefill_s,
            pass_sizes=dict(s.pass_sizes),
            drafters=s.drafters,
        )


# --------------------------------------------------------------------------- transformers
class HFRunner(Runner):
    """``model.generate`` greedy (or sampled), stopping at the same end-of-turn ids as specdec."""

    kind = "peer"

    def __init__(self, name: str, model: Any, tokenizer: Any, draft: Any = None) -> None:
        self.name, self.model, self.tokenizer, self.draft = name, model, tokenizer, draft
        self.passes = 0
        self._hook = model.register_forward_pre_hook(self._count)
        self.eos = sorted(tokenizer.eos_token_ids)

    def _count(self, *_: Any) -> None:
        self.passes += 1

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.name == "hf-pld":
            d["options"] = {"prompt_lookup_num_tokens": PLD_TOKENS}
        if (
            self.name == "hf-assisted"
        ):  # transformers' defaults, as its candidate generator fills them
            cfg = self.draft.generation_config
            try:
                defaults = cfg._get_default_generation_params()
            except AttributeError:  # older transformers: the defaults are the attributes
                defaults = {}
            keys = (
                "num_assistant_tokens",
                "num_assistant_tokens_schedule",
                "assistant_confidence_threshold",
            )
            d["options"] = {
                k: v if (v := getattr(cfg, k, None)) is not None else defaults.get(k) for k in keys
            }
        return d

    def _config(self, budget: int, temperature: float) -> Any:
        from transformers import GenerationConfig

        kw: dict[str, Any] = dict(
            max_new_tokens=budget,
            do_sample=temperature > 0,
            eos_token_id=self.eos or None,
            pad_token_id=self.eos[0] if self.eos else 0,
        )
        if temperature > 0:
            kw.update(temperature=temperature, top_p=1.0, top_k=0)
        if self.name == "hf-pld":
            kw["prompt_lookup_num_tokens"] = PLD_TOKENS
        return GenerationConfig(**kw)

    @torch.inference_mode()
    def run(self, messages, ids, budget, temperature, seed):
        dev = self.model.device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        kw: dict[str, Any] = dict(
            attention_mask=torch.ones_like(x), generation_config=self._config(budget, temperature)
        )
        if self.draft is not None:
            kw["assistant_model"] = self.draft
        if temperature > 0:
            torch.manual_seed(seed)
        self.passes = 0
        _sync(dev)
        t0 = time.perf_counter()
        out = self.model.generate(x, **kw)
        _sync(dev)
        wall = time.perf_counter() - t0
        new = out[0, len(ids) :].tolist()
        finish = "stop" if new and new[-1] in self.eos else "length"
        return self._output(new, ids, wall, finish)


def load_hf_models(gen: Any, model: str, draft: str | None, dtype: str, device: str):
    """The target (reused when specdec itself runs on the transformers backend) and the
    draft as ``transformers`` models, from the same files the native loader reads."""
    import transformers

    from specdec.models.hf_target import HFTarget, load_hf_target

    if not gen.progress:
        transformers.utils.logging.disable_progress_bar()
    if isinstance(gen.target, HFTarget):
        target = gen.target.model
    else:
        target = load_hf_target(model, dtype=dtype, device=device, progress=gen.progress)[0].model
    draft_model = None
    if draft is not None:
        draft_model = load_hf_target(draft, dtype=dtype, device=device, progress=gen.progress)[
            0
        ].model
        if (
            draft_model.get_output_embeddings().weight.shape[0]
            != (target.get_output_embeddings().weight.shape[0])
        ):
            raise InvalidRequestError(
                f"hf-assisted: draft {draft!r} has another vocabulary size than the target"
            )
    return target, draft_model


# --------------------------------------------------------------------------- llama.cpp
LLAMACPP_PLD_CONTEXT = 4096  # llamacpp-pld keeps n_ctx x vocabulary float32 logits


def llama_cpp_available() -> str | None:
    """None when ``llama_cpp`` imports, else why not (the note the report carries)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken shared library
        return (
            f"llama-cpp-python is not installed ({type(e).__name__}); ./install.sh --llamacpp "
            "(or pip install 'specdec[llamacpp]') adds it"
        )
    return None


class LlamaCppRunner(Runner):
    """``llama-cpp-python``'s ``Llama.generate`` over the same token ids; greedy is top-k 1."""

    kind = "peer"

    def __init__(self, name: str, gguf_path: str, n_ctx: int, tokenizer: Any) -> None:
        from llama_cpp import Llama

        kw: dict[str, Any] = dict(
            model_path=gguf_path,
            n_ctx=n_ctx,
            n_threads=torch.get_num_threads(),
            # prompt passes too (llama-cpp-python's default there is every core), as the
            # llama.cpp target and benchmarks/decode_speed.py set it
            n_threads_batch=torch.get_num_threads(),
            verbose=False,
        )
        if name == "llamacpp-pld":
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=PLD_TOKENS)
            # a draft model needs logits for every row, and llama-cpp-python sizes that
            # buffer n_ctx x vocabulary only when asked (4 GB at 4096 x 152k x float32)
            kw["logits_all"] = True
            kw["n_ctx"] = min(n_ctx, LLAMACPP_PLD_CONTEXT)
        self.name, self.tokenizer = name, tokenizer
        self.llm = Llama(**kw)
        self.eos = set(tokenizer.eos_token_ids)
        self.passes = 0
        inner_eval = self.llm.eval

        def counted_eval(tokens: Any) -> Any:
            self.passes += 1
            return inner_eval(tokens)

        self.llm.eval = counted_eval  # one call per target pass (the prefill included)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.name == "llamacpp-pld":
            d["options"] = {"num_pred_tokens": PLD_TOKENS}
        return d

    def run(self, messages, ids, budget, temperature, seed):
        kw: dict[str, Any] = (
            dict(temp=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(temp=0.0, top_k=1, top_p=1.0)
        )
        if temperature > 0:
            self.llm.set_seed(seed)
        self.passes = 0
        new: list[int] = []
        finish = "length"
        self.llm.reset()  # no reuse of a cached prompt prefix: every runner prefills in full
        t0 = time.perf_counter()
        for token in self.llm.generate(ids, reset=True, **kw):
            new.append(int(token))
            if token in self.eos:
                finish = "stop"
                break
            if len(new) >= budget:
                break
        wall = time.perf_counter() - t0
        return self._output(new, ids, wall, finish)


# --------------------------------------------------------------------------- server
def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class ServerRunner(Runner):
    """POST /v1/chat/completions, not streamed; the wall time is the whole request."""

    kind = "server"
    name = "server"

    def __init__(self, url: str, model: str, timeout_s: float = 600.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"--server takes an http(s) URL, got {url!r}")
        self.url, self.model, self.timeout_s = chat_completions_url(url), model, timeout_s

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "lossless": None, "url": self.url, "model": self.model}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace").strip().replace("\n", " ")
            raise ServerError(f"server {self.url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryUnreachableError(f"cannot reach server {self.url}: {reason}") from None
        try:
            data = json.loads(raw)
            data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ServerError(
                f"server {self.url} did not answer a chat completion: {raw[:120]!r}"
            ) from None
        return data

    def run(self, messages, ids, budget, temperature, seed):
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": budget,
            "temperature": temperature,
            "stream": False,
        }
        if temperature > 0:
            body["seed"] = seed
        t0 = time.perf_counter()
        data = self._post(body)
        wall = time.perf_counter() - t0
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        usage = data.get("usage") or {}
        new = usage.get("completion_tokens")
        if not isinstance(new, int):
            raise ServerError(f"server {self.url} gave no usage.completion_tokens")
        return TurnOutput(
            text=text,
            token_ids=None,
            new_tokens=new,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            wall_s=wall,
            finish_reason=choice.get("finish_reason"),
        )
