#!/usr/bin/env bash
# PAVE and TSV-M with the stock mergekit-yaml CLI, on tiny local models (no downloads).
# Run from the repository root after README command 1:  bash examples/mergekit_end_to_end.sh [DIR]
set -euo pipefail
dir="$(realpath -m "${1:-pave-example}")"   # absolute paths: mergekit reads "a/b" as a hub id
bin="$(dirname "$(command -v pave || echo .venv/bin/pave)")"
# 1. tiny base + 3 fine-tunes, their covariance files and three ready recipes
"$bin/pave" demo --out "$dir"
# 2. the same merges with the stock CLI, exactly as a user would publish them
for recipe in pave_task_arithmetic tsv_m; do
  "$bin/mergekit-yaml" "$dir/recipe_$recipe.yaml" "$dir/cli_$recipe"
done
# 3. what was written: weights, the model card naming the method, and PAVE's rank report
ls "$dir/cli_pave_task_arithmetic"
grep -m1 "merge method" "$dir/cli_pave_task_arithmetic/README.md"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('rho_i per model:', r['model_ratios'])" \
  "$dir/cli_pave_task_arithmetic/pave_rank_report.json"
