#!/usr/bin/env bash
# There, on the device machine: the GPU numbers issue 5 asks for.
#
#   bash scripts/gpu/bench.sh [tiny] [graphs] [default] [eval]      (all four without arguments)
#
#   tiny     benchmarks/modes.py on `tiny` (tracked in the repo: runs before the GGUF arrives)
#   graphs   the same with --cuda-graphs (model/step_graphs.py), to set beside `tiny`: the first
#            run of the captured steps, so its tokens (same as ar) are the check, its tok/s the gain
#   default  modes.py on the default model with the adapter drafter.sh trained (ADAPTER)
#   eval     blockdiff eval (code + QA): ar, diffusion at three thresholds, linear_spec
# All modes, batch 1, 4 and 16, bf16. Back through $OUT: modes-NAME.{md,json}, eval.json and
# log-bench.txt. Each section has its own time limit (MIN minutes), so one that overruns
# still leaves the others' files.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to the folder whose files come back}
exec > >(tee -a "$OUT/log-bench.txt") 2>&1
source scripts/gpu/env.sh || exit 1
ADAPTER=${ADAPTER:-runs/gpu/drafter/final}
if [ "${SMOKE:-0}" = 1 ]; then
    SIZE=(--num-prompts 2 --max-new-tokens 8 --batch-size 1,2) EVAL=(--limit 1 --max-new-tokens 16) MIN=3 DTYPE=auto
else
    SIZE=(--num-prompts 16 --max-new-tokens 64 --batch-size 1,4,16) EVAL=() MIN=${MIN:-2} DTYPE=bfloat16
fi
MODES=(--modes diffusion,linear_spec,quad_spec,auto --block-lengths 32 --quad-block-length 8 --thresholds 0.5,0.9
       --device "$DEVICE" --dtype "$DTYPE" --no-hf "${SIZE[@]}")

bench() {  # bench NAME ARGS...: one modes.py run; its table and JSON come back as NAME.md / NAME.json
    local name=$1; shift
    echo "== $name $(date -u +%T)"
    timeout "${MIN}m" $PY benchmarks/modes.py "$@" "${MODES[@]}" --out "runs/gpu/$name" --json "$OUT/$name.json"
    [ -f "runs/gpu/$name/table.md" ] && cp "runs/gpu/$name/table.md" "$OUT/$name.md"
}
adapter() {
    [ -d "$ADAPTER" ] || { echo "no adapter at $ADAPTER: run drafter.sh first (on this machine)" >&2; exit 1; }
}

for section in "${@:-tiny graphs default eval}"; do
    for part in $section; do
        case $part in
        tiny) bench modes-tiny --model tiny --prompt-set code ;;
        graphs)
            if [ "$DEVICE" = cuda ]; then bench modes-tiny-graphs --model tiny --prompt-set code --cuda-graphs
            else echo "graphs: CUDA graphs need a GPU; skipped on $DEVICE"; fi ;;
        default) need_default_model; adapter; bench modes-default --prompt-set chat --adapter "$ADAPTER" ;;
        eval)
            need_default_model; adapter
            echo "== eval $(date -u +%T)"
            timeout "${MIN}m" $PY -m blockdiff.cli eval --tasks code,qa --modes ar,diffusion,linear_spec \
                --thresholds 0.5,0.7,0.9 --block-length 32 --adapter "$ADAPTER" --device "$DEVICE" --dtype "$DTYPE" \
                "${EVAL[@]}" --out runs/gpu/eval
            [ -f runs/gpu/eval/results.json ] && cp runs/gpu/eval/results.json "$OUT/eval.json" ;;
        *) echo "unknown section $part (tiny, graphs, default, eval)" >&2; exit 2 ;;
        esac
    done
done
echo "== done $(date -u +%T)"
