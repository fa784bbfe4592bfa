#!/usr/bin/env bash
# PAVE and TSV-M with the stock mergekit-yaml CLI, on tiny local models (no downloads).
# Run from the repository root after the README's set-up:  bash examples/mergekit_end_to_end.sh [DIR]
set -euo pipefail
dir="$(realpath -m "${1:-pave-example}")"   # absolute paths: mergekit reads "a/b" as a hub id
bin="$(dirname "$(command -v pave || echo .venv/bin/pave)")"
# 1. tiny base + 3 fine-tunes (with a tokenizer), their covariance files and recipes for every method
"$bin/pave" demo --out "$dir"
# 2. merges with the stock CLI, exactly as a user would publish them
for recipe in pave_ta tsv_m; do
  "$bin/mergekit-yaml" "$dir/mergekit/$recipe.yaml" "$dir/cli/$recipe"
done
# 3. what was written: weights, the model card naming the method, and PAVE's rank report
ls "$dir/cli/pave_ta"
grep -m1 "merge method" "$dir/cli/pave_ta/README.md"
"$bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print('rho_i per model:', r['model_ratios'])" \
  "$dir/cli/pave_ta/pave_rank_report.json"
