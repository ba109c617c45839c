#!/usr/bin/env bash
# Re-run every measurement quoted in benchmarks/RESULTS.md, in the order of its sections.
#   make results            (or: bash benchmarks/reproduce.sh [SECTION ...])
# Sections: modes-default spec-blocks-default modes-tiny eval-default eval-tiny serve-tiny serve-trained serve-auto
#   engine-targets (not in the default list: the engine issue's targets, about 45 min; needs `make llama`)
# Each writes its raw output under bench-out/SECTION/ (JSON, markdown, PNGs, logs).
# CPU timings are only comparable within one run: each command runs its modes round-robin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench-out
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(modes-default spec-blocks-default modes-tiny eval-default eval-tiny serve-tiny serve-trained serve-auto)

run() {  # run SECTION CMD...: echo the command, keep its log next to its outputs
    local section=$1; shift
    mkdir -p "$OUT/$section"
    echo "== $section: $*"
    "$@" 2>&1 | tee "$OUT/$section/log.txt"
}

for section in "${sections[@]}"; do
    case $section in
    modes-default)  # the default model = SmolLM2-135M-Instruct + the shipped drafter
        run "$section" $PY benchmarks/modes.py --prompt-set chat --max-new-tokens 64 --block-lengths 32 \
            --quad-block-length 8 --thresholds 0.5,0.7,0.9 --repeats 1 --out "$OUT/$section" ;;
    spec-blocks-default)  # linear_spec's draft length: acceptance against the cost of a step
        run "$section" $PY benchmarks/modes.py --prompt-set chat --num-prompts 8 --max-new-tokens 64 \
            --modes linear_spec --block-lengths 4,8,32 --no-hf --repeats 1 --out "$OUT/$section" ;;
    modes-tiny)
        run "$section" $PY benchmarks/modes.py --model tiny --prompt-set code --max-new-tokens 64 \
            --block-lengths 16,32 --quad-block-length 8 --thresholds 0.5,0.9 --repeats 2 --out "$OUT/$section" ;;
    eval-default)
        run "$section" $PY -m blockdiff.cli eval --tasks code,qa --modes ar,diffusion,linear_spec,quad_spec,auto \
            --thresholds 0.5,0.7,0.9 --block-length 32 --quad-block-length 8 --out "$OUT/$section" ;;
    eval-tiny)
        run "$section" $PY -m blockdiff.cli eval --model tiny --tasks code --modes ar,diffusion,linear_spec,quad_spec \
            --thresholds 0.5,0.9 --block-length 32 --quad-block-length 8 --max-new-tokens 64 --out "$OUT/$section" ;;
    serve-tiny)  # the tests' random model, float32, 1 thread
        run "$section-linear_spec" $PY benchmarks/serve_load.py --tiny
        run "$section-ar" $PY benchmarks/serve_load.py --tiny --mode ar
        run "$section-diffusion" $PY benchmarks/serve_load.py --tiny --mode diffusion --block-length 8 ;;
    serve-trained)
        for mode in ar linear_spec diffusion auto; do
            run "$section-$mode" $PY benchmarks/serve_load.py --model tiny --mode "$mode" --num-requests 64 \
                --max-tokens 64 --concurrency 1,32 --dtype auto --threads 2
        done ;;
    serve-auto)  # auto against ar in A-B-B-A order, so drift of the shared VM cancels out
        for run_mode in 1-ar 2-auto 3-auto 4-ar; do
            run "$section-$run_mode" $PY benchmarks/serve_load.py --model tiny --mode "${run_mode#*-}" --num-requests 64 \
                --max-tokens 64 --concurrency 1,32 --dtype auto --threads 2
        done ;;
    engine-targets)  # RESULTS.md, sessions 18-20 (AMX Xeon): llama.cpp in the batch-1 runs where it is installed
        chat=(-m blockdiff.cli bench --prompt-set chat --max-new-tokens 64 --no-hf)
        run "$section-defaults-b1" $PY "${chat[@]}" --modes linear_spec,quad_spec,diffusion,auto --batch-size 1 \
            --out "$OUT/$section-defaults-b1"
        for quantization in int4 int8 w4a8 auto; do
            run "$section-$quantization-b1" $PY "${chat[@]}" --modes linear_spec,quad_spec,auto --batch-size 1 \
                --quantization "$quantization" --out "$OUT/$section-$quantization-b1"
        done
        run "$section-defaults-b16" $PY "${chat[@]}" --modes linear_spec,quad_spec,diffusion,auto --batch-size 16 \
            --no-llama-cpp --out "$OUT/$section-defaults-b16"
        for quantization in none int4 w4a8; do
            run "$section-ar-b32-$quantization" $PY "${chat[@]}" --num-prompts 32 --modes ar --batch-size 1,32 \
                --no-llama-cpp --quantization "$quantization" --out "$OUT/$section-ar-b32-$quantization"
        done
        run "$section-forwards" $PY benchmarks/engine.py --quantizations none,int4,w4a8 --rounds 2 --num-prompts 8 \
            --max-new-tokens 64
        run "$section-kernels" $PY benchmarks/kernels.py --rows 1,2,8,32 --repeats 5
        run "$section-attention" $PY benchmarks/attention.py
        for batch in 1 16; do
            run "$section-diffusion-blocks-b$batch" $PY "${chat[@]}" --modes diffusion --block-lengths 2,4,8 \
                --batch-size "$batch" --no-llama-cpp --out "$OUT/$section-diffusion-blocks-b$batch"
        done ;;
    *) echo "unknown section $section" >&2; exit 2 ;;
    esac
done
