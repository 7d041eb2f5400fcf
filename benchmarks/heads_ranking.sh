#!/usr/bin/env bash
# Every head kind trained on the same data and CPU budget, then benchmarked side by side.
#
#   benchmarks/heads_ranking.sh            # MODEL, MINUTES, FEATURES, LIMIT, TOKENS to change
#
# Long: the EAGLE-1 feature store (FEATURES tokens of the model's hidden states, shared by
# every kind), MINUTES of training per kind, then `specdec bench`. Run it in the
# background (nohup ... &) on an otherwise idle machine: a test run beside it halves its
# training and skews its timings. It resumes: a kind whose training was cut short goes on
# from its checkpoint (`--resume`; a finished one is only evaluated again), and the store
# is filled where it stopped. Heads land in the model cache (`specdec heads`), the report
# in bench-out/heads-<model>/ (report.md, summary.json).
set -euo pipefail
MODEL=${MODEL:-qwen2.5-coder-1.5b}
MINUTES=${MINUTES:-25}
FEATURES=${FEATURES:-90000}
LIMIT=${LIMIT:-2}
TOKENS=${TOKENS:-128}
KINDS=${KINDS:-medusa hydra clover chimera falcon}
SPECDEC=${SPECDEC:-specdec}

for kind in $KINDS; do
    echo "== train $kind ($MINUTES min)" >&2
    "$SPECDEC" train "$kind" --model "$MODEL" --feature-tokens "$FEATURES" \
        --minutes "$MINUTES" --resume
done
methods="ar,pld,$(echo "$KINDS" | tr ' ' ',')"
echo "== bench $methods" >&2
"$SPECDEC" bench --model "$MODEL" --methods "$methods" --limit "$LIMIT" \
    --max-new-tokens "$TOKENS" --out "bench-out/heads-$MODEL"
