#!/usr/bin/env bash
# Run SPARQ with each of the four strategies on the lab, then compare them in one plot.
#
#   launch/sparq_strategies.sh /tmp/sparq_strategies [--config.x=y ...]
#
# Each run has its own workdir (re-running resumes); the comparison lands in
# ROOT/compare.png and ROOT/compare.json.
set -euo pipefail
root=$1
shift
for s in static_uniform static_diverse dynamic_uniform dynamic_diverse; do
  python -m qdc_jax.main --config=configs/sparq.py --workdir="$root/$s" \
    --config.sparq.strategy="$s" "$@"
done
python -m qdc_jax.sparq.report --compare "$root"/static_uniform "$root"/static_diverse \
  "$root"/dynamic_uniform "$root"/dynamic_diverse --out="$root/compare.png" \
  > "$root/compare.json"
echo "wrote $root/compare.png and $root/compare.json"
