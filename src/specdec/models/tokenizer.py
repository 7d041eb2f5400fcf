"""Tokenizer and chat template, read from `tokenizer.json` / `tokenizer_config.json`.

Behaves like `transformers`' fast tokenizer on the same files (a parity test
checks it) without importing `transformers`: the `tokenizers` library does the
encoding and a sandboxed Jinja environment set up as `transformers` sets it up
renders the chat template.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from specdec.errors import InvalidRequestError, ModelFormatError

# Tokens that end a turn in the chat formats we know, besides the declared EOS.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class Tokenizer:
    def __init__(self, folder: Path | str) -> None:
        # imported with the first tokenizer, not with this module (which commands that
        # load no model, e.g. `specdec methods`, import too)
        from tokenizers import Tokenizer as FastTokenizer

        folder = Path(folder)
        try:
            self._tok = FastTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template_file = folder / "chat_template.jinja"
        if template_file.exists():
            self.chat_template: str | None = template_file.read_text()
        else:
            self.chat_template = self.config.get("chat_template")
        gen_path = folder / "generation_config.json"
        self._generation_eos: list[int] = []
        if gen_path.exists():
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
            self._generation_eos = [eos] if isinstance(eos, int) else list(eos or [])

    # -- special tokens ------------------------------------------------------
    def _token_str(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # older configs store AddedToken dicts
            value = value.get("content")
        return value

    @cached_property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k in _SPECIAL_KEYS if (v := self._token_str(k)) is not None}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Token string → id, added tokens included (to tell whether two tokenizers agree)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the declared EOS, generation_config's, and end-of-turn markers."""
        ids = set(self._generation_eos)
        eos = self._token_str("eos_token")
        for token in ([eos] if eos else []) + list(_END_OF_TURN):
            if (i := self._tok.token_to_id(token)) is not None:
                ids.add(i)
        return frozenset(ids)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._token_str("bos_token")
        return self._tok.token_to_id(bos) if bos else None

    # -- text <-> ids --------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Plain text (no special tokens) to ids, many texts at once (in parallel)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template; pass --raw for a plain prompt"
            )
        template = _compile(self.chat_template)
        context = {**self.special_tokens_map, **kwargs}
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        # transformers encodes the rendered chat without adding special tokens again.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Decodes a short window of recent tokens so that tokenizers whose output
    depends on neighbours (byte-level merges, leading spaces) stay correct.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens whose text has been emitted

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip)
        text = decode(self.ids[self.prefix :], self.skip)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            piece = text[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip)
        text = decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


_compiled: dict[str, Any] = {}


def _compile(source: str) -> Any:
    """Compile a chat template in the environment transformers uses (sandboxed, trimmed)."""
    if source in _compiled:
        return _compiled[source]
    import jinja2  # only chat templates need it, once per template
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        _compiled[source] = env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelFormatError(f"the model's chat template does not compile: {e}") from None
    return _compiled[source]
