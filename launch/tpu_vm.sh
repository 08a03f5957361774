#!/usr/bin/env bash
# Create a TPU VM, copy this checkout to every worker, install, and run one config on all hosts.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh qdc-v4 us-central2-b v4-32 configs/arith_lab.py gs://bucket/run1 \
#       --config.mesh.shape='(-1,1,4)'
#
# Every host runs the same command; --config.mesh.distributed=True makes each call
# jax.distributed.initialize() so the mesh spans all hosts. WORKDIR should be a gs:// path
# (orbax writes there from every host). Re-running the same command resumes from WORKDIR.
set -euo pipefail
name=$1 zone=$2 accel=$3 config=$4 workdir=$5
shift 5
version=${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}
if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
    --version "$version"
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$repo" --exclude=.git --exclude=.venv -czf /tmp/qdc_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/qdc_jax.tgz "$name":~/ --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; mkdir -p ~/qdc_jax && tar -C ~/qdc_jax -xzf ~/qdc_jax.tgz && cd ~/qdc_jax &&
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip &&
  pip install -q -e . 'jax[tpu]' &&
  python -m qdc_jax.main --config=$config --workdir=$workdir --config.mesh.distributed=True $*"
