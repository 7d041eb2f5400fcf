"""The method table: names, options (parsed and checked once), auto, labels, merges."""

import dataclasses
import json
from pathlib import Path

import pytest

from specdec.errors import InvalidRequestError
from specdec.speculation.drafters.base import BuildContext
from specdec.speculation.drafters.prompt_lookup import PromptLookupDrafter, PromptLookupOptions
from specdec.speculation.methods import (
    AUTO,
    DRAFTERS,
    METHODS,
    auto_options,
    base_name,
    get_method,
    is_method,
    resolve,
)
from specdec.speculation.options import parse_assignments


def test_the_table_is_the_drafters_by_name():
    assert list(METHODS) == [d.name for d in DRAFTERS]
    for name, drafter in METHODS.items():
        assert drafter.description and drafter.Options.method == name
        method = get_method(name)
        assert method.description == drafter.description and method.lossless
        # the defaults are valid options, and what a user sees is what runs
        assert method.effective_options({}) == drafter.Options().to_dict()


def test_options_parse_and_check_once():
    o = PromptLookupOptions.parse({"num_draft_tokens": "5", "size_by_cost": "no"})
    assert o.num_draft_tokens == 5 and o.size_by_cost is False
    assert PromptLookupDrafter(o).k == 5
    assert PromptLookupDrafter(num_draft_tokens=6).k == 6  # keywords: the same checks
    for given, message in [
        ({"num_draft_tokens": "0"}, "num_draft_tokens of method 'pld' must be >= 1"),
        ({"num_draft_tokens": "x"}, "must be int, got 'x'"),
        ({"size_by_cost": "maybe"}, "must be bool"),
        ({"min_ngram": "3", "max_ngram": "2"}, "min_ngram <= max_ngram"),
        ({"nope": 1}, "takes no option 'nope'"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            PromptLookupOptions.parse(given)
    with pytest.raises(InvalidRequestError, match=">= 1"):
        PromptLookupDrafter(max_nodes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.max_nodes = 3  # type: ignore[misc]


def test_every_option_is_described():
    for drafter in METHODS.values():
        for name, d in drafter.Options.describe().items():
            assert d["help"] and d["type"], f"{drafter.name}.{name}"


def test_auto_is_data_and_depends_on_the_weights():
    data = json.loads(Path(__file__).parents[1].joinpath(
        "src/specdec/speculation/auto.json").read_text())
    assert data["models"] == AUTO
    for by_weights in AUTO.values():
        for entry in by_weights.values():
            assert entry["why"]
            get_method("auto").parse(entry["options"])  # its options are valid
            for name in entry["options"]["drafters"].split(","):
                assert is_method(name), name
    assert auto_options("qwen2.5-coder-1.5b", "none")["tree"] == "dynamic"
    assert auto_options("qwen2.5-coder-1.5b", "gguf")["draft_quant"] == "int4"
    assert auto_options("qwen2.5-coder-1.5b", "int4") == auto_options("qwen2.5-coder-1.5b", "gguf")
    assert auto_options("some-other-model", "gguf") == {}
    assert "recycle" in auto_options("smollm2-135m", "none")["drafters"]


def test_resolve_auto_and_labels_once():
    method, opts = resolve("auto", {}, "qwen2.5-coder-1.5b", "gguf")
    assert method == "auto" and opts["draft_quant"] == "int4"
    method, opts = resolve("auto", {"num_draft_tokens": 6}, "qwen2.5-coder-1.5b", "none")
    assert method == "auto" and opts["tree"] == "dynamic" and opts["num_draft_tokens"] == 6
    assert resolve("auto@x", {}, "unknown-model") == ("auto", {})
    assert resolve("draft@wide", {"tree": "3,2"}, "m") == ("draft", {"tree": "3,2"})
    assert base_name("pld+recycle@joint") == "pld+recycle"


def test_option_assignments_parsed_once():
    assert parse_assignments(["max-nodes=4", "a=b=c"]) == [("", "max_nodes", "4"), ("", "a", "b=c")]
    assert parse_assignments(["draft@t.tree=dynamic", "k=1"], scoped=True) == [
        ("draft@t", "tree", "dynamic"),
        ("", "k", "1"),
    ]
    for bad in ["novalue", "=3", ".k=3"]:
        with pytest.raises(InvalidRequestError, match="--option takes"):
            parse_assignments([bad], scoped=True)


def test_merges_take_every_part_option_and_joint():
    method = get_method("pld+recycle+ngram-cache")
    assert method.merged and "joint" in method.option_names()
    assert set(method.option_names()) >= {"branches", "top_k", "min_share"}
    with pytest.raises(InvalidRequestError, match="takes no option 'window'"):
        method.parse({"window": 3})
    with pytest.raises(InvalidRequestError, match="must be bool"):
        method.parse({"joint": "sometimes"})
    drafter = method.build(BuildContext(tokenizer=None, vocab_size=16), {"joint": "false"})
    assert [d.name for d in drafter.drafters] == ["pld", "recycle", "ngram-cache"]
    for bad in ["ar+pld", "pld+nope", "pld+", "pld+recycle@x+stand", "medusa+hydra"]:
        assert not is_method(bad)


def test_draft_methods_say_what_they_need():
    ctx = BuildContext(tokenizer=None, vocab_size=16)
    for name in ("draft", "cross-vocab"):
        with pytest.raises(InvalidRequestError, match="needs a draft model: --draft MODEL"):
            get_method(name).build(ctx, {})
