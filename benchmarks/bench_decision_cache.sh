#!/bin/bash
# The predictor's auto decision cached per machine, on the real model: three `clada bench` processes per thread count,
# one after the other, on a copy of this machine's clada cache (the native kernel and the threshold rule's timings)
# without the predictor's entries. Writes RESULTS_FOLDER/cache-f32-b1-tT-N.json; prints the cache's entries.
#   bash benchmarks/bench_decision_cache.sh RESULTS_FOLDER [ARTIFACT]     # ~8 min on 2 CPU cores
#   e.g. bash benchmarks/bench_decision_cache.sh results/bench/amd-epyc-f25m1/auto   (a folder per CPU: lscpu)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/bench_decision_cache.sh RESULTS_FOLDER [ARTIFACT] (a results folder named for this CPU)" >&2
  exit 2
fi
out=$1
artifact=${2:-out/smollm2-135m/clada.safetensors}
if [ ! -f "$artifact" ]; then
  echo "bench_decision_cache.sh: no artifact file $artifact (run clada-calibrate recipes/smollm2-135m.yaml first)" >&2
  exit 2
fi
src=${CLADA_CACHE:-$HOME/.cache/clada}
export CLADA_CACHE=$(mktemp -d)
trap 'rm -rf "$CLADA_CACHE"' EXIT
for part in native selection; do if [ -d "$src/$part" ]; then cp -r "$src/$part" "$CLADA_CACHE/"; fi; done
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
      2>&1 | tail -n 8  # (pipefail: a failing run stops the script with its status)
  done
done
grep -h -A3 '"predictor|' "$CLADA_CACHE"/selection/*.json || true
