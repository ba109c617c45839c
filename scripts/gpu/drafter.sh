#!/usr/bin/env bash
# There, on a lent GPU, in the call that carries the last GGUF part (see pack.sh): assemble the
# default model, self-distil a larger data set, and train the SmolLM2 drafter, within one call.
#
#   bash scripts/gpu/drafter.sh          (env: DISTILL_MIN=2 TRAIN_MIN=2.5 LR=3e-4 MICRO_BATCH=64)
#
# 1. distil: SmolLM2's greedy answers to data/distill-prompts-large.jsonl (6838 prompts), for
#    DISTILL_MIN minutes (`blockdiff distill` appends and resumes, so a cut-off run is valid);
# 2. probe: 6 training steps, to size the schedule to TRAIN_MIN minutes of steps;
# 3. convert: the shipped adapter, trained on the new answers and data/smollm2-distill.jsonl
#    with the whole warmup-stable-decay schedule inside TRAIN_MIN (run.max_minutes is the net).
# Back through $OUT: drafter.tgz (final/ adapter, metrics.jsonl, loss.png, config) and log.txt.
# runs/gpu stays on the machine for scripts/gpu/bench.sh while it is warm.
# SMOKE=1 runs the same steps on the CPU at toy sizes (the check before spending device time).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the folder whose files come back}
RUN=runs/gpu
mkdir -p "$RUN"
exec > >(tee "$OUT/log.txt") 2>&1
bash scripts/gpu/receive.sh
source scripts/gpu/env.sh  # assembles the GGUF, installs gguf, sets PY and DEVICE
need_default_model

if [ "${SMOKE:-0}" = 1 ]; then
    DISTILL=(--limit 3 --max-new-tokens 8 --batch-size 3)
    TRAIN=(--optim.micro_batch 2 --data.max_tokens 4000)
    DISTILL_MIN=0.5 TRAIN_MIN=0.3
else
    DISTILL=(--max-new-tokens 200 --batch-size 256)
    TRAIN=(--optim.micro_batch "${MICRO_BATCH:-64}")
fi
DISTILL_MIN=${DISTILL_MIN:-2} TRAIN_MIN=${TRAIN_MIN:-2.5}
COMMON=(--config configs/smollm2-drafter.yaml --run.device "$DEVICE" --lora.init models/smollm2-drafter
        --data.paths "[$RUN/distill.jsonl, data/smollm2-distill.jsonl]" --optim.grad_accum 1 --run.progress false
        --run.save_every 1000000 "${TRAIN[@]}")

echo "== distill ($DISTILL_MIN min) $(date -u +%T)"
timeout "${DISTILL_MIN}m" $PY -m blockdiff.cli distill data/distill-prompts-large.jsonl --out "$RUN/distill.jsonl" \
    --device "$DEVICE" "${DISTILL[@]}" || [ $? = 124 ]
echo "$(wc -l <"$RUN/distill.jsonl") answers"

echo "== probe $(date -u +%T)"
rm -rf "$RUN/probe"
$PY -m blockdiff.cli convert "${COMMON[@]}" --optim.max_steps 6 --optim.warmup_steps 1 --run.eval_every 0 --run.out_dir "$RUN/probe"
steps=$($PY - "$RUN/probe/metrics.jsonl" "$TRAIN_MIN" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
step_s = sum(r["step_s"] for r in records[2:]) / len(records[2:])  # the first steps warm up
print(max(10, int(float(sys.argv[2]) * 60 / step_s)))
EOF
)
echo "$steps steps fit in $TRAIN_MIN min"

echo "== convert $(date -u +%T)"
rm -rf "$RUN/drafter"
$PY -m blockdiff.cli convert "${COMMON[@]}" --optim.max_steps "$steps" --optim.warmup_steps $((steps / 20 + 1)) \
    --optim.lr "${LR:-3e-4}" --optim.min_lr "${MIN_LR:-3e-5}" --run.max_minutes "$($PY -c "print($TRAIN_MIN * 1.3)")" \
    --run.eval_every "$steps" --run.out_dir "$RUN/drafter"
$PY -m blockdiff.cli plot-train "$RUN/drafter" --smooth 10 || true
tar czf "$OUT/drafter.tgz" -C "$RUN" drafter/final drafter/metrics.jsonl drafter/config.yaml \
    $(cd "$RUN" && ls drafter/loss.png 2>/dev/null)
echo "== done $(date -u +%T): $OUT/drafter.tgz $(du -h "$OUT/drafter.tgz" | cut -f1)"
