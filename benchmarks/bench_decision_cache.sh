#!/bin/bash
# The predictor's auto decision cached per machine, on the real model: three `clada bench` processes per thread count,
# one after the other, on a copy of this machine's clada cache (the native kernel and the threshold rule's timings)
# without the predictor's entries. Writes results/bench/<cpu>/auto/cache-f32-b1-tT-N.json; prints the cache's entries.
#   bash benchmarks/bench_decision_cache.sh [artifact] [results folder]     # ~8 min on 2 CPU cores
set -euo pipefail
artifact=${1:-out/smollm2-135m/clada.safetensors}
out=${2:-results/bench/amd-epyc-f25m1/auto}
src=${CLADA_CACHE:-$HOME/.cache/clada}
export CLADA_CACHE=$(mktemp -d)
trap 'rm -rf "$CLADA_CACHE"' EXIT
for part in native selection; do [ -d "$src/$part" ] && cp -r "$src/$part" "$CLADA_CACHE/"; done
python - "$CLADA_CACHE" <<'PY'  # drop the predictor's decisions: every process below starts from the same cache
import json, pathlib, sys
for f in pathlib.Path(sys.argv[1], "selection").glob("*.json"):
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("predictor|")}))
PY
mkdir -p "$out"
for t in 1 2; do
  for i in 1 2 3; do
    echo "[$(date +%H:%M:%S)] threads $t process $i"
    clada bench --model smollm2-135m --artifact "$artifact" --reps 5 --threads "$t" --json "$out/cache-f32-b1-t$t-$i.json" \
      2>&1 | grep -E "ratio|predictor" || true
  done
done
grep -h -A3 '"predictor|' "$CLADA_CACHE"/selection/*.json || true
