#!/usr/bin/env bash
# The thesis's QDC comparison on the lab: SPARQ's four strategies, the four phase-2 filters at
# one budget (on the static_uniform archive), then the QDC measures of every generated set next
# to the scores its distilled student reached.
#
#   [BUDGET=N] launch/sparq_qdc.sh ROOT [--config.x=y ...]   (BUDGET: filter budget, default 32)
#
# Every step resumes (re-run the same line after a kill). Results: ROOT/qdc_strategies/report.md
# and ROOT/qdc_filters/report.md (+ PNGs). One seed (sparq.seed=0); add seeds with
# --config.sparq.seed=S and another ROOT.
set -euo pipefail
root=$1
budget=${BUDGET:-32}  # the lab run: half the 65 unique questions with QUALITY > 0
shift
launch/sparq_strategies.sh "$root/strategies" "$@"
su=$root/strategies/static_uniform
for f in quality diversity qd random; do
  d=$root/filters/$f
  mkdir -p "$d"
  # The filters select from the same archive; its evaluation of the baseline is reused.
  [ -d "$d/archive" ] || cp -r "$su/archive" "$d/archive"
  [ -f "$d/eval_baseline.json" ] || cp "$su/eval_baseline.json" "$d/"
  python -m qdc_jax.main --config=configs/sparq.py --workdir="$d" \
    --config.phase2.filter="$f" --config.phase2.budget="$budget" "$@"
done
s=$root/strategies
python -m qdc_jax.main --config=configs/qdc.py --workdir="$root/qdc_strategies" \
  --config.student.enabled=False \
  --config.data.paths="$s/static_uniform,$s/static_diverse,$s/dynamic_uniform,$s/dynamic_diverse,$s/static_uniform/phase2.jsonl,$s/static_diverse/phase2.jsonl,$s/dynamic_uniform/phase2.jsonl,$s/dynamic_diverse/phase2.jsonl" \
  --config.data.names="SU_archive,SD_archive,DU_archive,DD_archive,SU_phase2,SD_phase2,DU_phase2,DD_phase2"
f=$root/filters
python -m qdc_jax.main --config=configs/qdc.py --workdir="$root/qdc_filters" \
  --config.student.enabled=False \
  --config.data.paths="$su/phase2.jsonl,$f/quality/phase2.jsonl,$f/diversity/phase2.jsonl,$f/qd/phase2.jsonl,$f/random/phase2.jsonl" \
  --config.data.names="none,quality,diversity,qd,random"
echo "wrote $root/qdc_strategies/report.md and $root/qdc_filters/report.md"
