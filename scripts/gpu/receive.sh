#!/usr/bin/env bash
# There, on the device machine: keep the parts of the GGUF this call carried (.gpu/part-K/) in
# /tmp/blockdiff-gpu, which outlives the call while the machine stays warm. See pack.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
STORE=/tmp/blockdiff-gpu
mkdir -p "$STORE/parts" "$STORE/whl"
for dir in .gpu/part-*; do
    [ -d "$dir" ] || continue
    cp "$dir"/gguf.[0-9]* "$STORE/parts/"
    cp "$dir/gguf.sha256" "$STORE/"
    if [ -d "$dir/whl" ]; then cp "$dir"/whl/*.whl "$STORE/whl/"; fi
done
expected=$(cut -d' ' -f2 "$STORE/gguf.sha256")
echo "$(ls "$STORE/parts" | wc -l) of $expected parts received: $(ls "$STORE/parts" | tr '\n' ' ')"
