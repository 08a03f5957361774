#!/usr/bin/env bash
# A local flag sweep: one run per value of one config key, each in its own workdir.
#
#   launch/sweep.sh configs/arith_lab.py train.opt.lr "1e-3 3e-3 1e-2" /tmp/lr_sweep [--config.x=y ...]
#
# Runs are sequential (one machine); re-running the sweep resumes unfinished runs.
set -euo pipefail
config=$1 key=$2 values=$3 root=$4
shift 4
for v in $values; do
  python -m qdc_jax.main --config="$config" --workdir="$root/${key}=$v" "--config.$key=$v" "$@"
done
