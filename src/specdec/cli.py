"""Command line: `specdec generate | methods | bench | models | pull | datastore build | auto |
train eagle | medusa | hydra | clover | chimera | falcon | draft | heads | export eagle | export medusa`.

Errors a user can cause print one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from specdec import __version__
from specdec.errors import SpecdecError
from specdec.models.catalog import DEFAULT_MODEL
from specdec.speculation.options import parse_assignments


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for `bench` records
    logging.basicConfig(level=logging.WARNING, format="specdec: %(message)s")
    try:
        return args.func(args) or 0
    except SpecdecError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nspecdec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `specdec generate ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec",
        description="Faster LLM generation with unchanged output: speculative decoding.",
    )
    parser.add_argument("--version", action="version", version=f"specdec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_generate(sub)
    _add_serve(sub)
    _add_methods(sub)
    _add_bench(sub)
    _add_profile(sub)
    _add_models_and_pull(sub)
    _add_datastore(sub)
    _add_auto(sub)
    _add_train(sub)
    _add_export(sub)
    return parser


def _add_generate(sub: Any) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text from a prompt (streams to stdout)",
        description="Generate a reply to PROMPT and stream it to stdout. The prompt is wrapped in "
        "the model's chat template unless --raw. The model is pulled on first use.",
    )
    g.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads standard input")
    _add_model_args(g, DEFAULT_MODEL)
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="most tokens to generate (default 256)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (default) decodes greedily; > 0 samples",
    )
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when TEXT is generated (repeatable)",
    )
    g.add_argument(
        "--method",
        default="auto",
        metavar="NAME",
        help="decoding method (default auto: each step the drafter that has earned the "
        "most tokens per second on this machine; see `specdec methods`)",
    )
    g.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="draft model for --method draft (same vocabulary as the target) or "
        "--method cross-vocab (any tokenizer)",
    )
    g.add_argument(
        "--num-draft-tokens", type=int, default=None, metavar="K", help="tokens drafted per step"
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other method option (repeatable)",
    )
    g.add_argument(
        "--compare",
        action="store_true",
        help="also decode autoregressively in the same process; report speedup and "
        "whether the outputs are identical",
    )
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, stats) instead of streaming",
    )
    g.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    g.set_defaults(func=cmd_generate)


def _add_serve(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP: /v1/chat/completions and /v1/completions "
        "(streaming or not), /v1/models, /health, /metrics (Prometheus). Requests decode "
        "together in one batch, each with speculation; how much each one drafts is chosen "
        "every step from its measured acceptance and the cost of the batch's pass, so that "
        "under load it falls back to plain batching. A request may name its own method in "
        "the body field 'method' (options in 'method_options'). One log line per request.",
    )
    _add_model_args(s, DEFAULT_MODEL)
    s.add_argument(
        "--method",
        default="auto",
        metavar="NAME",
        help="the requests' decoding method unless they name one (default auto)",
    )
    s.add_argument("--draft", default=None, metavar="MODEL", help="draft model for --method draft")
    s.add_argument(
        "--num-draft-tokens", type=int, default=None, metavar="K", help="tokens drafted per step"
    )
    s.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a method option"
    )
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: loopback)"
    )
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="B",
        help="most requests decoding at once (default 16); others wait in the queue",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="most requests waiting; beyond it requests get 429 (default 256)",
    )
    s.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="memory for the requests' KV caches (default: 3/4 of what is free after "
        "loading); a request waits until its cache fits, one that never could gets 400",
    )
    s.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        metavar="N",
        help="max_tokens of requests that give none (default 256)",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a request running longer is cancelled (default 600 s)",
    )
    s.add_argument(
        "--no-goodput",
        action="store_true",
        help="let every request draft what its drafter wants, whatever the load",
    )
    s.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $SPECDEC_API_KEY, or none)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress or request log on stderr")
    s.set_defaults(func=cmd_serve)


def _add_methods(sub: Any) -> None:
    ms = sub.add_parser(
        "methods",
        help="list the decoding methods and their options",
        description="List every decoding method: options, losslessness, needs.",
    )
    ms.add_argument("--json", action="store_true", help="print a JSON list")
    ms.set_defaults(func=cmd_methods)


def _add_bench(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmark methods and peers on Spec-Bench-style datasets",
        description="Run decoding methods (and peers: hf-ar, hf-assisted, hf-pld, llamacpp-*) "
        "on the same prompts, interleaved, after a warm-up; write results.jsonl, summary.json, "
        "report.md and plots to --out. Greedy outputs are checked against ar's.",
    )
    _add_model_args(b, DEFAULT_MODEL)
    from specdec.bench.harness import add_arguments as _add_bench_arguments

    _add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)


def _add_profile(sub: Any) -> None:
    pr = sub.add_parser(
        "profile",
        help="a model's decode step against this machine's memory and compute limits",
        description="Print the machine's memory bandwidth (measured once, cached), the weight "
        "bytes a decode step reads and the floor they set, the measured step, and the cost "
        "of one pass over k = 1..64 tokens (the curve draft trees are sized by); for "
        "quantised models also the roofline of each pass.",
    )
    _add_model_args(pr, DEFAULT_MODEL)
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument(
        "--refresh", action="store_true", help="measure the pass-cost curve again (it is cached)"
    )
    pr.add_argument("--quiet", action="store_true", help="no progress on stderr")
    pr.set_defaults(func=cmd_profile)


def _add_models_and_pull(sub: Any) -> None:
    m = sub.add_parser(
        "models",
        help="list the known models and where they are",
        description="List the models specdec can pull by name, and their local paths.",
    )
    m.add_argument("--json", action="store_true", help="print a JSON list")
    m.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "pull",
        help="download a known model into the cache",
        description="Fetch a known model into the cache folder ($SPECDEC_CACHE, default "
        "~/.cache/specdec), check its sha256 and print its path as the last line.",
    )
    p.add_argument("name", metavar="NAME", help="a name from `specdec models`")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pull)


def _add_auto(sub: Any) -> None:
    a = sub.add_parser(
        "auto",
        help="show or forget what --method auto has learnt on this machine",
        description="--method auto picks a drafter each step by the tokens per second each "
        "has earned on this machine, and keeps that record in the cache, per target model, "
        "weights and device. This lists the records (per drafter: the weight of its recent "
        "steps, tokens per step, tokens per second); --reset deletes them.",
    )
    a.add_argument("--model", default=None, metavar="M", help="only the records of model M")
    a.add_argument("--reset", action="store_true", help="delete the records (auto learns afresh)")
    a.add_argument("--json", action="store_true", help="print a JSON list")
    a.set_defaults(func=cmd_auto)


def _add_train(sub: Any) -> None:
    from specdec.train.eagle import TrainConfig

    d = TrainConfig()
    t = sub.add_parser(
        "train",
        help="train a learned drafter (EAGLE, Medusa or Hydra heads) for a model, here",
        description="Train a drafter that reads the model's hidden states and store it in "
        "the cache, where --method KIND finds it. Progress goes to stderr; features and "
        "checkpoints are kept, so --resume continues a run that was cut short.",
    )
    tsub = t.add_subparsers(dest="train_command", required=True, metavar="KIND")
    e = tsub.add_parser(
        "eagle",
        help="an EAGLE head: one decoder layer on the model's own features",
        description="Stages: the model answers the training prompts (self-distillation) "
        "and its hidden states are computed for every training token (kept on disk); the "
        "draft vocabulary is the most frequent tokens; epochs run until --minutes or "
        "--tokens; the head is evaluated on held-out sequences (top-1 agreement with the "
        "model per drafting depth) and written to the cache (`specdec heads` lists it).",
    )
    _add_model_args(e, DEFAULT_MODEL)
    _add_train_args(e, d, "the head", "sequence tokens x unrolled steps", "--method eagle")
    e.add_argument(
        "--version", type=int, choices=(1, 3), default=d.version,
        help="1: EAGLE-1 (reads the last layer; stored as the model's 'eagle' head); 3: "
        "EAGLE-3 (three layers fused, its own LM head; 'eagle3', the one --method eagle "
        "prefers; exportable to vLLM with `specdec export eagle`) (default 1)",
    )  # fmt: skip
    e.add_argument("--unroll", type=int, default=d.unroll, metavar="K",
                   help=f"drafting depths trained per sequence (default {d.unroll})")  # fmt: skip
    e.set_defaults(func=cmd_train_eagle)

    from specdec.train.chimera import ChimeraTrainConfig
    from specdec.train.clover import CloverTrainConfig
    from specdec.train.falcon import FalconTrainConfig
    from specdec.train.hydra import HydraTrainConfig
    from specdec.train.medusa import MedusaTrainConfig

    m_d = MedusaTrainConfig()
    m = tsub.add_parser(
        "medusa",
        help="Medusa heads: residual blocks on the model's last hidden state",
        description="Medusa-1 heads: head k guesses the token k + 1 places after the next "
        "one, all from the model's last hidden state. The features are the EAGLE-1 "
        "head's (the same data's store is read, not computed again); each head's residual "
        "blocks train towards the model's own distribution (its LM head is shared, "
        "frozen); the held-out accuracy of each head's i-th guess, written with the "
        "heads, is what --method medusa builds its tree from.",
    )
    _add_model_args(m, DEFAULT_MODEL)
    _add_train_args(m, m_d, "the heads", "sequence tokens x heads", "--method medusa")
    _add_heads_args(m, m_d)
    m.set_defaults(func=cmd_train_medusa)

    y_d = HydraTrainConfig()
    y = tsub.add_parser(
        "hydra",
        help="Hydra++ heads: an extra decoder layer, then heads that read the tokens "
        "drafted before them",
        description="Hydra++ heads: one decoder layer over the model's last hidden states, "
        "then head k reads its output beside the embeddings of the next token and the k "
        "guessed after it, and guesses the one after those. The features are the EAGLE-1 "
        "head's (read, not computed again); the heads train towards the model's own "
        "distribution (teacher distillation; its LM head shared, frozen) with dropout and "
        "weight decay; the held-out accuracy of each head's i-th guess, given the right "
        "tokens before it, is what --method hydra builds its tree from.",
    )
    _add_model_args(y, DEFAULT_MODEL)
    _add_train_args(y, y_d, "the heads", "sequence tokens x heads", "--method hydra")
    _add_heads_args(y, y_d)
    y.add_argument("--dropout", type=float, default=y_d.dropout,
                   help=f"dropout on the heads' inputs and outputs (default {y_d.dropout:g})")  # fmt: skip
    y.add_argument("--weight-decay", type=float, default=y_d.weight_decay,
                   help=f"AdamW weight decay (default {y_d.weight_decay:g})")  # fmt: skip
    y.set_defaults(func=cmd_train_hydra)

    c_d = CloverTrainConfig()
    c = tsub.add_parser(
        "clover",
        help="Clover heads: an augmenting decoder layer, then heads regressive through a "
        "chain of states",
        description="Clover heads: one decoder layer over the model's last hidden states "
        "(the augmenting block), then per depth an attention decoder folds the token "
        "before it (the model's LM-head row, normalised) into a chain of states, and an "
        "MLP guesses the next token through the model's LM head (shared, frozen). The "
        "features are the EAGLE-1 head's (read, not computed again); the heads train "
        "towards the model's own distribution; the held-out accuracy of each head's i-th "
        "guess, given the right tokens before it, is what --method clover builds its "
        "tree from.",
    )
    _add_model_args(c, DEFAULT_MODEL)
    _add_train_args(c, c_d, "the heads", "sequence tokens x heads", "--method clover")
    _add_heads_args(c, c_d)
    c.set_defaults(func=cmd_train_clover)

    x_d = ChimeraTrainConfig()
    x = tsub.add_parser(
        "chimera",
        help="Chimera heads: a trigram encoder and a full-context decoder over the model's "
        "hidden states, with residual heads",
        description="Chimera heads: the last three tokens' embeddings through an MLP (the "
        "trigram encoder) query one decoder layer over the model's hidden states at every "
        "committed position (the full-context decoder); head r adds its output to the "
        "model's last state (residual heads) and guesses through the model's LM head "
        "(shared, frozen). The features are the EAGLE-1 head's (read, not computed again); "
        "the heads train towards the model's own distribution; the held-out accuracy of "
        "each head's i-th guess, given the right tokens before it, is what --method "
        "chimera builds its tree from.",
    )
    _add_model_args(x, DEFAULT_MODEL)
    _add_train_args(x, x_d, "the heads", "sequence tokens x heads", "--method chimera")
    x.add_argument("--heads", type=int, default=x_d.num_heads, metavar="K",
                   help=f"heads: tokens guessed beyond the next (default {x_d.num_heads})")  # fmt: skip
    x.set_defaults(func=cmd_train_chimera, layers=1)

    f_d = FalconTrainConfig()
    f = tsub.add_parser(
        "falcon",
        help="a Falcon drafter: one decoder layer on the model's hidden states that guesses "
        "k tokens per pass",
        description="Falcon: one decoder layer reads each token beside the model's hidden "
        "state before it, in blocks of k tokens that see each other (the relaxed causal "
        "mask), and predicts the state k - 1 places on: one pass guesses k tokens, each "
        "from its own top guesses. Trained by coupled sequential glancing distillation: a "
        "first pass counts the tokens it gets wrong, a share of the blocks' first inputs "
        "are replaced by the ground truth they should predict, and a second pass learns "
        "the model's hidden states and distribution. The features are the EAGLE-1 head's "
        "(read, not computed again); the held-out accuracy of each depth's i-th guess, "
        "drafted as --method falcon drafts, is what it builds its tree from.",
    )
    _add_model_args(f, DEFAULT_MODEL)
    _add_train_args(f, f_d, "the drafter", "sequence tokens x depths", "--method falcon")
    f.add_argument("--heads", type=int, default=f_d.num_heads, metavar="K",
                   help=f"drafting depths: tokens guessed beyond the next (default {f_d.num_heads})")  # fmt: skip
    f.add_argument("--block", type=int, default=f_d.block, metavar="K",
                   help=f"tokens guessed per pass (default {f_d.block})")  # fmt: skip
    f.add_argument("--glance", type=float, nargs=2, default=(f_d.glance_start, f_d.glance_end),
                   metavar=("START", "END"),
                   help="the share of wrong guesses whose blocks glance at the truth, falling "
                   f"from START to END over the run (default {f_d.glance_start:g} "
                   f"{f_d.glance_end:g})")  # fmt: skip
    f.set_defaults(func=cmd_train_falcon, layers=1)

    from specdec.train.divergences import DIVERGENCES
    from specdec.train.draft import DraftTrainConfig

    r_d = DraftTrainConfig()
    r = tsub.add_parser(
        "draft",
        help="a draft model distilled towards the model (DistillSpec's divergences), maybe "
        "cut to its first layers",
        description="Distils a small model of the same vocabulary (--draft) towards the "
        "target (--model): the target's answers to the training prompts and code, with its "
        "hidden states at every position (the EAGLE-1 store of the same data, read if the "
        "heads made one), give its next-token distribution; the draft, maybe cut to its first "
        "--layers layers, learns it under the --loss divergence. Held-out acceptance and "
        "greedy agreement are measured before and after; the draft is written to the cache "
        "under --name, where --draft NAME finds it.",
    )
    _add_model_args(r, DEFAULT_MODEL)
    r.add_argument("--draft", default=r_d.draft, metavar="D",
                   help=f"the model to train: a known name, GGUF file or folder of the target's "
                   f"vocabulary (default {r_d.draft})")  # fmt: skip
    r.add_argument("--layers", type=int, default=None, metavar="N",
                   help="keep the draft's first N decoder layers (default: all)")  # fmt: skip
    r.add_argument("--loss", choices=DIVERGENCES, default=r_d.loss,
                   help="fkl: KL(target || draft); rkl: KL(draft || target); jsd: their "
                   "generalised Jensen-Shannon mix (--beta); tvd: total variation, one minus "
                   f"the acceptance rate (default {r_d.loss})")  # fmt: skip
    r.add_argument("--data-from", choices=("target", "draft"), default=r_d.data_from,
                   help="target: the model's own answers and the code, with its hidden states "
                   "(the heads' feature store); draft: on-policy, the draft answers each prompt "
                   "as it is at that step and the model scores the answer (DistillSpec), code "
                   f"teacher-forced (default {r_d.data_from})")  # fmt: skip
    r.add_argument("--beta", type=float, default=r_d.beta,
                   help=f"the JSD's weight of the target's side (default {r_d.beta:g})")  # fmt: skip
    r.add_argument("--temperature", type=float, default=r_d.temperature,
                   help="the temperature both distributions are taken at: the decoding one "
                   f"whose acceptance to raise (default {r_d.temperature:g})")  # fmt: skip
    r.add_argument("--rows", type=int, default=r_d.rows, metavar="N",
                   help=f"positions scored per training sequence (default {r_d.rows})")  # fmt: skip
    r.add_argument("--name", default=None,
                   help="the trained draft's name in the cache (default DRAFT[-Nl]-for-MODEL)")  # fmt: skip
    _add_train_args(r, r_d, "the draft", "sequence tokens", "--draft NAME")
    r.set_defaults(func=cmd_train_draft)

    h = sub.add_parser(
        "heads",
        help="list the trained heads in the cache, with their evaluation",
        description="Heads made by `specdec train`, per model: how they were trained and "
        "how often they agree with the model on held-out text, per drafting depth.",
    )
    h.add_argument("--json", action="store_true", help="print a JSON list")
    h.set_defaults(func=cmd_heads)


def _add_train_args(p: Any, d: Any, what: str, token_unit: str, method: str) -> None:
    """The options every `specdec train KIND` takes; ``d``: its config's defaults."""
    p.add_argument(
        "--data",
        default=d.data,
        help="comma-separated sources: prompts (Spec-Bench, HumanEval, GSM8K questions the "
        "benchmarks never take, answered by the model), python (the standard library's "
        'sources), or a .txt / .jsonl file ({"text": ...} or {"prompt": ...} lines) '
        f"(default {d.data})",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, metavar="N",
                        help=f"training time, resumed runs included (default {d.minutes:g})")  # fmt: skip
    budget.add_argument("--tokens", type=int, default=None, metavar="N",
                        help=f"or: training tokens ({token_unit})")  # fmt: skip
    p.add_argument("--feature-tokens", type=int, default=d.feature_tokens, metavar="N",
                   help=f"tokens of features to compute (default {d.feature_tokens:,})")  # fmt: skip
    p.add_argument("--respond", type=int, default=d.respond, metavar="N",
                   help=f"tokens the model answers each prompt with (default {d.respond})")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=d.seq_len, metavar="N",
                   help=f"longest training sequence (default {d.seq_len})")  # fmt: skip
    if hasattr(d, "draft_vocab"):
        p.add_argument("--draft-vocab", type=int, default=d.draft_vocab, metavar="N",
                       help=f"tokens {what} may draft (default {d.draft_vocab})")  # fmt: skip
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"write {what} here (default: the cache, where {method} looks)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the last run (its features, checkpoint and minutes)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress")


def _add_heads_args(p: Any, d: Any) -> None:
    p.add_argument("--heads", type=int, default=d.num_heads, metavar="K",
                   help=f"heads: tokens guessed beyond the next (default {d.num_heads})")  # fmt: skip
    p.add_argument("--layers", type=int, default=d.num_layers, metavar="N",
                   help=f"residual blocks per head (default {d.num_layers})")  # fmt: skip


def _train_args(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The options `_add_train_args` added, as ``config``'s fields."""
    minutes = args.minutes if args.minutes is not None or args.tokens else config.minutes
    return {
        "data": args.data,
        "minutes": minutes,
        "tokens": args.tokens,
        "feature_tokens": args.feature_tokens,
        "seq_len": args.seq_len,
        "respond": args.respond,
        "lr": args.lr,
        "seed": args.seed,
        **({"draft_vocab": args.draft_vocab} if hasattr(config, "draft_vocab") else {}),
    }


def _add_export(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write a trained head in another engine's format (vLLM's)",
        description="Write a head trained here in a format other engines load.",
    )
    xsub = x.add_subparsers(dest="export_command", required=True, metavar="KIND")
    e = xsub.add_parser(
        "eagle",
        help="an EAGLE-3 head as a speculators checkpoint (vLLM serves it natively)",
        description="Write the model's EAGLE-3 head (`specdec train eagle --version 3`) as a "
        "speculators checkpoint: config.json (speculators_model_type eagle3) and "
        "model.safetensors, without the embedding (vLLM shares the target's). Serve it "
        'with vLLM: --speculative-config \'{"model": "DIR", "method": "eagle3", '
        '"num_speculative_tokens": 3}\'. `--method eagle --option head=DIR` reads such a '
        "folder back.",
    )
    e.add_argument("--model", default=DEFAULT_MODEL, metavar="M",
                   help=f"whose head (default {DEFAULT_MODEL})")  # fmt: skip
    e.add_argument("--head", default=None, metavar="DIR",
                   help="the head's folder (default: the model's EAGLE-3 head in the cache)")  # fmt: skip
    e.add_argument("--format", default="speculators", choices=("speculators",),
                   help="the checkpoint format (default speculators)")  # fmt: skip
    e.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    e.add_argument("--verifier", default=None, metavar="NAME",
                   help="the target as the other engine names it (default: the model's "
                   "Hugging Face id when known)")  # fmt: skip
    e.add_argument("--tokens", type=int, default=3, metavar="K",
                   help="speculative tokens the checkpoint suggests (default 3)")  # fmt: skip
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the weights' type: float32 (exactly the head, the default) or "
                   "bfloat16 (half the bytes)")  # fmt: skip
    e.set_defaults(func=cmd_export_eagle)
    m = xsub.add_parser(
        "medusa",
        help="Medusa heads as a vLLM Medusa checkpoint",
        description="Write the model's Medusa heads (`specdec train medusa`) as a vLLM Medusa "
        "checkpoint: config.json (model_type medusa, one shared LM head, a token_map for the "
        "draft vocabulary) and model.safetensors with the blocks and the target's LM-head rows "
        "at the draft vocabulary (so the target loads, to read them). Serve it with vLLM: "
        '--speculative-config \'{"model": "DIR", "method": "medusa", '
        '"num_speculative_tokens": 3}\'. Hydra heads have no public format: not exported.',
    )
    _add_model_args(m, DEFAULT_MODEL)
    m.add_argument("--heads", default=None, metavar="DIR",
                   help="the heads' folder (default: the model's Medusa heads in the cache)")  # fmt: skip
    m.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    m.add_argument("--top-k", type=int, default=10, metavar="K",
                   help="the topk its config suggests (default 10)")  # fmt: skip
    m.add_argument("--weights-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the weights' type: float32 (exactly the heads, the default) or "
                   "bfloat16 (half the bytes)")  # fmt: skip
    m.add_argument("--quiet", action="store_true", help="no progress on stderr")
    m.set_defaults(func=cmd_export_medusa)


def _add_datastore(sub: Any) -> None:
    d = sub.add_parser(
        "datastore",
        help="build a retrieval datastore for --method rest",
        description="Retrieval datastores for REST (--method rest): a corpus tokenised by the "
        "model's tokenizer, with a suffix array over it, read memory-mapped.",
    )
    dsub = d.add_subparsers(dest="datastore_command", required=True, metavar="ACTION")
    db = dsub.add_parser(
        "build",
        help="tokenise files and index them",
        description="Tokenise the input files with the model's tokenizer and write a datastore "
        "folder. Without --out it goes where `--method rest` looks by default, so it becomes "
        "the default datastore for models with this tokenizer.",
    )
    db.add_argument("--model", default=DEFAULT_MODEL, metavar="M", help="whose tokenizer")
    db.add_argument(
        "--input",
        nargs="+",
        default=["stdlib"],
        metavar="FILE",
        help="files, folders (their .py .md .txt .rst .json .jsonl files), or stdlib: the "
        "Python standard library's source (default)",
    )
    db.add_argument("--out", default=None, metavar="PATH", help="datastore folder to write")
    db.add_argument("--quiet", action="store_true", help="no progress bar")
    db.set_defaults(func=cmd_datastore_build)


def _add_model_args(p: argparse.ArgumentParser, default_model: str) -> None:
    from specdec.models.quant_linear import QUANTS

    p.add_argument(
        "--model",
        default=default_model,
        metavar="M",
        help=f"known name, GGUF file, safetensors folder or hub id (default {default_model})",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="compute dtype (default auto: float32 around quantised linears; beside float "
        "ones bfloat16 where the CPU computes it (AVX-512), float32 elsewhere)",
    )
    p.add_argument(
        "--quant",
        choices=list(QUANTS),
        default="auto",
        help="weights of the linear layers: gguf (the GGUF file's own blocks, e.g. "
        "Q4_K/Q6_K, exactly), int8 or int4 (per-32 blocks), none (float); quantised "
        "layers run specdec's native kernel. auto (default): gguf for a quantised GGUF "
        "on a CPU with AVX-512 VNNI, none otherwise",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--backend",
        choices=["native", "hf", "llamacpp"],
        default="native",
        help="native (default): specdec's runtime; hf: transformers, for "
        "architectures the native runtime lacks; llamacpp: a GGUF on llama.cpp's own "
        "kernels (needs llama-cpp-python; methods that need hidden states are refused)",
    )


def _read_prompt(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    return arg


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.draft is not None:
        opts["draft_model"] = args.draft
    if args.num_draft_tokens is not None:
        opts["num_draft_tokens"] = args.num_draft_tokens
    for _, key, value in parse_assignments(args.option):
        opts[key] = value
    return opts


def _load_generator(args: argparse.Namespace):
    """The model the command line names (`_add_model_args`), with progress and info logs
    unless --quiet."""
    from specdec.api import Generator

    if not args.quiet:
        _enable_info_logging()
    return Generator.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        progress=not args.quiet,
        quant=args.quant,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args.prompt)
    gen = _load_generator(args)
    method_opts = _method_options(args)
    method = args.method
    gen.drafter(method, **method_opts)  # load and validate before any output
    opts: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        raw=args.raw,
        method=method,
        **method_opts,
    )
    if args.compare:
        gen.generate(prompt, **{**opts, "max_new_tokens": 4})  # warm-up
    if args.json:
        result = gen.generate(prompt, **opts)
    else:
        for piece in gen.stream(prompt, **opts):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = gen.last
    report = _result_json(result)
    report["method"] = gen.resolve(method, method_opts)[0]
    if args.json and getattr(gen, "loaded", None) is not None:
        from specdec.bench.machine import machine_info

        nbytes = gen.loaded.weight_bytes
        report["stats"]["weight_bytes_per_step"] = nbytes
        # what reading the weights once costs at this machine's bandwidth (measured once)
        floor = nbytes / (machine_info()["bandwidth_gbs"] * 1e9) * 1e3
        report["stats"]["floor_ms"] = round(floor, 3)
    if args.compare:
        base_opts = {k: v for k, v in opts.items() if k not in method_opts}
        base = gen.generate(prompt, **{**base_opts, "method": "ar"})
        from specdec.bench.report import speedup, speedup_basis

        report["ar_stats"] = base.stats.to_dict()
        # greedy: ar time / time (the same tokens); sampled: tokens/s over ar's, since the
        # outputs differ in length and a ratio of times would compare different work
        basis = speedup_basis(args.temperature)
        m, b = result.stats, base.stats
        ratio = speedup(basis, m.new_tokens, m.wall_s, b.new_tokens, b.wall_s)
        report["speedup"] = round(ratio, 3) if ratio is not None else None
        report["speedup_basis"] = basis
        report["identical"] = base.token_ids == result.token_ids if args.temperature == 0 else None
    if args.json:
        print(json.dumps(report))
    if not args.quiet:
        s = result.stats
        line = (
            f"[specdec] {report['method']}: {s.new_tokens} tokens in {s.wall_s:.2f} s, "
            f"{s.tokens_per_s:.1f} tok/s (prefill {s.prefill_s:.2f} s for {s.prompt_tokens} "
            f"tokens), tau {s.tau:.2f}"
        )
        if s.drafted:
            line += f", accepted {s.accepted}/{s.drafted} drafted"
        if s.drafters:  # auto: which drafters ran, and what their steps earned
            ran = sorted(s.drafters.items(), key=lambda kv: -kv[1]["steps"])
            line += "; ran " + ", ".join(
                f"{arm} {u['steps']}x (tau {u['tau']:.2f})" for arm, u in ran
            )
        if args.compare:
            ratio = "—" if report["speedup"] is None else f"{report['speedup']:.2f}x"
            if report["speedup_basis"] == "tokens_per_s":
                ratio += " (ratio of tokens/s: sampled, the outputs differ in length)"
            line += (
                f"; ar {report['ar_stats']['tokens_per_s']:.1f} tok/s, speedup {ratio}, "
                f"identical: {report['identical']}"
            )
        print(line, file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from specdec.errors import InvalidRequestError

    for name, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 0),
        ("--max-tokens", args.max_tokens, 1),
        ("--port", args.port, 0),
    ):
        if value < low:
            raise InvalidRequestError(f"{name} must be >= {low}, got {value}")
    if args.max_memory is not None and args.max_memory <= 0:
        raise InvalidRequestError(f"--max-memory must be > 0 GB, got {args.max_memory}")
    if args.request_timeout <= 0:
        raise InvalidRequestError("--request-timeout must be > 0")
    try:
        import uvicorn

        from specdec.serve.app import create_app
        from specdec.serve.service import Service
    except ImportError as e:  # pragma: no cover - both are dependencies
        raise InvalidRequestError(f"the server needs fastapi and uvicorn: {e}") from None
    api_key = args.api_key or os.environ.get("SPECDEC_API_KEY") or None
    gen = _load_generator(args)
    service = Service(
        gen,
        method=args.method,
        options=_method_options(args),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_memory_bytes=int(args.max_memory * 2**30) if args.max_memory else None,
        goodput=not args.no_goodput,
        background=False,  # the engine steps on this (the main) thread: see Service
    )
    app = create_app(
        service,
        model_name=args.model,
        api_key=api_key,
        default_max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)

    def serve_http() -> None:
        try:
            server.run()
        finally:
            service.close()  # the engine's loop on the main thread returns

    import signal
    import threading
    import time

    http = threading.Thread(target=serve_http, name="specdec-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise InvalidRequestError(
                f"cannot listen on {args.host}:{args.port} (in use, or not an address here?)"
            )
        time.sleep(0.05)
    if not args.quiet:
        logging.getLogger("specdec.serve").setLevel(logging.INFO)
        loopback = args.host in ("127.0.0.1", "localhost", "::1")
        print(
            f"[specdec] serving {args.model} on http://{args.host}:{args.port}/v1 "
            f"(method {args.method}, batches of up to {service.engine.max_batch}, "
            f"KV budget {service.memory_budget / 2**30:.1f} GiB"
            f"{', API key required' if api_key else ''})",
            file=sys.stderr,
        )
        if not loopback and not api_key:
            print(
                "[specdec] warning: listening beyond loopback without --api-key",
                file=sys.stderr,
            )

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        service.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from specdec.bench.profile import profile, render

    gen = _load_generator(args)
    gen.progress = not args.quiet
    report = profile(gen, refresh=args.refresh)
    print(json.dumps(report) if args.json else render(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from specdec.bench.harness import run_from_args

    if not args.quiet:
        _enable_info_logging()
    return run_from_args(args, args.argv)


def cmd_methods(args: argparse.Namespace) -> int:
    from specdec.speculation.methods import AUTO, METHODS, MergeOptions

    rows = [
        {
            "name": name,
            "description": d.description,
            "lossless": d.lossless,
            "lossy_with": d.lossy_with or None,
            "options": d.Options.describe(),
        }
        for name, d in METHODS.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        kind = "lossless" if r["lossless"] else "LOSSY"
        if r["lossy_with"]:
            kind += f"; LOSSY with {r['lossy_with']}"
        print(f"{r['name']}  ({kind})\n    {r['description']}")
        for k, o in r["options"].items():
            print(f"    --option {k}=<{o['type']}>  {o['help']} (default {o['default']})")
        if r["name"] == "auto":
            for model, by_weights in AUTO.items():
                for weights, entry in by_weights.items():
                    shown = " ".join(f"{k}={v}" for k, v in entry["options"].items())
                    print(f"    for {model} ({weights} weights): {shown}")
        print()
    joint = MergeOptions.describe()["joint"]
    print(
        "A+B  (e.g. pld+recycle) the trees of several drafting methods merged into one and "
        "verified in one pass;\n    an option goes to every part that takes it"
    )
    print(f"    --option joint=<bool>  {joint['help']} (default {joint['default']})")
    return 0


def cmd_auto(args: argparse.Namespace) -> int:
    from specdec.speculation.drafters.auto import read_record, records_dir, summarise_record

    rows = []
    for path in sorted(records_dir().glob("*.json")):
        data = read_record(path)
        identity = str(data.get("identity", ""))
        if args.model is not None and identity.split("|", 1)[0] != args.model:
            continue
        rows.append({"path": str(path), "identity": identity, "arms": summarise_record(data)})
        if args.reset:
            path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.reset:
        print(f"forgot {len(rows)} record{'s' * (len(rows) != 1)} of --method auto")
    elif not rows:
        print(f"no records of --method auto in {records_dir()} yet")
    for row in rows if not (args.json or args.reset) else []:
        model, _, rest = row["identity"].partition("|")
        print(f"{model or '?'}  ({rest.replace('|', ', ')})")
        for mode, arms in row["arms"].items():
            print(f"  {mode}:")
            for arm, a in sorted(arms.items(), key=lambda kv: -kv[1]["tokens_per_s"]):
                print(f"    {arm:32s} {a['tokens_per_s']:8.2f} tok/s  tau {a['tau']:.2f}  "
                      f"(weight {a['steps']:.1f} steps)")  # fmt: skip
    return 0


def cmd_train_eagle(args: argparse.Namespace) -> int:
    from specdec.train.eagle import TrainConfig, train

    cfg = TrainConfig(**_train_args(args, TrainConfig), version=args.version, unroll=args.unroll)
    cfg.check()  # before the model loads
    gen = _load_generator(args)
    report = train(gen, cfg, out=args.out, resume=args.resume, progress=not args.quiet)
    ev = report["evaluation"]
    print(
        f"head for {gen.name}: {report['trained_tokens']:,} training tokens in "
        f"{report['train_seconds'] / 60:.1f} min; held-out top-1 by depth "
        f"{', '.join(f'{a:.2f}' for a in ev['top1_by_depth'])}"
        + (f"; tau {report['engine']['tau_chain4']:.2f} (chain of 4)" if "engine" in report else "")
    )
    return 0


def _train_heads(args: argparse.Namespace, kind: str) -> int:
    """`specdec train medusa`, `hydra`, `clover`, `chimera` and `falcon`."""
    if kind == "hydra":
        from specdec.train.hydra import HydraTrainConfig as Config
        from specdec.train.hydra import train

        extra = {"dropout": args.dropout, "weight_decay": args.weight_decay}
    elif kind == "clover":
        from specdec.train.clover import CloverTrainConfig as Config
        from specdec.train.clover import train

        extra = {}
    elif kind == "chimera":
        from specdec.train.chimera import ChimeraTrainConfig as Config
        from specdec.train.chimera import train

        extra = {}
    elif kind == "falcon":
        from specdec.train.falcon import FalconTrainConfig as Config
        from specdec.train.falcon import train

        extra = {"block": args.block, "glance_start": args.glance[0], "glance_end": args.glance[1]}
    else:
        from specdec.train.medusa import MedusaTrainConfig as Config
        from specdec.train.medusa import train

        extra = {}
    cfg = Config(
        **_train_args(args, Config), num_heads=args.heads, num_layers=args.layers, **extra
    )
    cfg.check()  # before the model loads
    gen = _load_generator(args)
    report = train(gen, cfg, out=args.out, resume=args.resume, progress=not args.quiet)
    ev = report["evaluation"]
    what, by = ("drafter", "depth") if kind == "falcon" else ("heads", "head")
    print(
        f"{HEAD_SETS[kind]} {what} for {gen.name}: {report['trained_tokens']:,} training "
        f"tokens in {report['train_seconds'] / 60:.1f} min; held-out top-1 by {by} "
        f"{', '.join(f'{a:.2f}' for a in ev['top1_by_head'])}"
    )
    return 0


def cmd_train_medusa(args: argparse.Namespace) -> int:
    return _train_heads(args, "medusa")


def cmd_train_hydra(args: argparse.Namespace) -> int:
    return _train_heads(args, "hydra")


def cmd_train_clover(args: argparse.Namespace) -> int:
    return _train_heads(args, "clover")


def cmd_train_chimera(args: argparse.Namespace) -> int:
    return _train_heads(args, "chimera")


def cmd_train_falcon(args: argparse.Namespace) -> int:
    return _train_heads(args, "falcon")


def cmd_train_draft(args: argparse.Namespace) -> int:
    from specdec.train.draft import DraftTrainConfig, check_name, describe, train

    cfg = DraftTrainConfig(
        **_train_args(args, DraftTrainConfig),
        draft=args.draft,
        layers=args.layers,
        loss=args.loss,
        data_from=args.data_from,
        beta=args.beta,
        temperature=args.temperature,
        rows=args.rows,
    )
    cfg.check()  # before the models load
    check_name(args.name)
    gen = _load_generator(args)
    report = train(gen, cfg, name=args.name, out=args.out, resume=args.resume,
                   progress=not args.quiet)  # fmt: skip
    print(f"draft {report['name']} for {gen.name}: {report['trained_tokens']:,} training tokens "
          f"in {report['train_seconds'] / 60:.1f} min; {describe(report)}")  # fmt: skip
    return 0


def cmd_export_eagle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specdec.errors import InvalidRequestError
    from specdec.models.catalog import KNOWN_MODELS
    from specdec.models.eagle_head import head_folder, load_head
    from specdec.models.speculators_format import export_head

    folder = Path(args.head) if args.head else head_folder(args.model, "eagle3")
    if not folder.exists():
        raise InvalidRequestError(
            f"no EAGLE-3 head at {folder}: train one with `specdec train eagle --model "
            f"{args.model} --version 3`"
        )
    if args.tokens < 1:
        raise InvalidRequestError(f"--tokens must be >= 1, got {args.tokens}")
    head = load_head(folder)
    name = head.config.target.get("name") or args.model
    known = KNOWN_MODELS.get(name)
    verifier = args.verifier or (known.hub_id if known and known.hub_id else name)
    import torch

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    out = export_head(head, args.out, verifier, tokens=args.tokens, dtype=dtype)
    print(f"wrote {out} (EAGLE-3 for {verifier}; {head.config.draft_vocab:,}-token draft "
          f"vocabulary; reads layers {list(head.config.feature_layers)})")  # fmt: skip
    return 0


def cmd_export_medusa(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from specdec.errors import InvalidRequestError
    from specdec.models.eagle_head import head_folder
    from specdec.models.medusa_format import export_medusa
    from specdec.models.medusa_heads import MedusaHeads

    folder = Path(args.heads) if args.heads else head_folder(args.model, "medusa")
    if not folder.exists():
        raise InvalidRequestError(
            f"no Medusa heads at {folder}: train them with `specdec train medusa --model "
            f"{args.model}`"
        )
    if args.top_k < 1:
        raise InvalidRequestError(f"--top-k must be >= 1, got {args.top_k}")
    heads = MedusaHeads.load(folder)  # before the model loads: a bad folder fails fast
    gen = _load_generator(args)
    dtype = torch.bfloat16 if args.weights_dtype == "bfloat16" else torch.float32
    out = export_medusa(heads, gen.target.model, args.out, top_k=args.top_k, dtype=dtype)
    print(f"wrote {out} (vLLM Medusa for {gen.name}: {heads.num_heads} heads, "
          f"{heads.config.draft_vocab:,}-token draft vocabulary)")  # fmt: skip
    return 0


# the head kinds whose accuracy is recorded per head (EAGLE's: per drafting depth)
HEAD_SETS = {"medusa": "Medusa-1", "hydra": "Hydra++", "clover": "Clover-1", "chimera": "Chimera",
             "falcon": "Falcon"}


def cmd_heads(args: argparse.Namespace) -> int:
    from specdec.models.eagle_head import CONFIG_FILE, heads_dir

    rows = []
    for cfg_file in sorted(heads_dir().glob(f"*/*/{CONFIG_FILE}")):
        try:
            data = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            continue
        training = data.get("training") or {}
        rows.append({
            "model": data.get("target", {}).get("name", cfg_file.parent.parent.name),
            "kind": data.get("kind", cfg_file.parent.name),
            "version": data.get("version", 1),
            "folder": str(cfg_file.parent),
            "draft_vocab": data.get("draft_vocab"),
            "training": training,
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no trained heads in {heads_dir()} yet: `specdec train eagle --model M` makes one")
    for r in rows:
        t = r["training"]
        ev = t.get("evaluation", {})
        by = "head" if r["kind"] in HEAD_SETS else "depth"
        acc = ", ".join(f"{a:.2f}" for a in ev.get(f"top1_by_{by}", []))
        what = HEAD_SETS.get(r["kind"], f"EAGLE-{r['version']}")
        print(f"{r['model']}  {r['kind']} ({what})  {r['folder']}")
        print(f"  trained on {t.get('trained_tokens', 0):,} tokens in "
              f"{t.get('train_seconds', 0) / 60:.1f} min ({t.get('data', '?')}); "
              f"held-out top-1 by {by}: {acc or '?'}")  # fmt: skip
    return 0


def _result_json(result: Any) -> dict[str, Any]:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "stats": result.stats.to_dict(),
    }


def _enable_info_logging() -> None:
    logging.getLogger("specdec").setLevel(logging.INFO)


def cmd_models(args: argparse.Namespace) -> int:
    from specdec.models.catalog import DEFAULT_MODEL, KNOWN_MODELS, local_path

    rows = []
    for m in KNOWN_MODELS.values():
        path = local_path(m.name)
        rows.append(
            {
                "name": m.name,
                "path": str(path) if path else None,
                "architecture": m.architecture,
                "size_bytes": m.size,
                "description": m.description,
                "default": m.name == DEFAULT_MODEL,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    for r in rows:
        mark = "*" if r["default"] else " "
        where = r["path"] or "(not pulled)"
        print(f"{mark} {r['name']:<{width}}{r['size_bytes'] / 1e6:>7.0f} MB  {r['description']}")
        print(f"  {'':<{width}}{where}")
    print("\n* default model. `specdec pull NAME` fetches one; any command pulls what it needs.")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from specdec.models.catalog import pull

    path = pull(args.name, progress=not args.quiet, force=args.force)
    print(path)
    return 0


def cmd_datastore_build(args: argparse.Namespace) -> int:
    from specdec.models.loading import load_tokenizer
    from specdec.speculation.datastore import build, default_path, input_files

    tokenizer = load_tokenizer(args.model, progress=not args.quiet)
    files = input_files(args.input)
    out = args.out or default_path(tokenizer)
    meta = build(tokenizer, files, out, progress=not args.quiet)
    print(
        f"{meta['tokens']:,} tokens from {meta['documents']} files, "
        f"{meta['bytes'] / 2**20:.1f} MiB, in {meta['build_s']} s",
        file=sys.stderr,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
