#!/usr/bin/env bash
# Run one config on a Cloud TPU VM slice (one host or a pod slice): plain multi-controller JAX,
# the same command on every host, each calling jax.distributed.initialize() (--distributed).
#
#   launch/tpu_vm.sh [FLAGS] NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
#
#   launch/tpu_vm.sh --spot qdc-v4 us-central2-b v4-32 configs/arith_lab.py gs://BUCKET/run1 \
#       --config.mesh.shape='(-1,1,4)'
#
# Steps (each gcloud command is echoed before it runs; --dry_run prints them and runs nothing):
#   1. `describe` the TPU VM NAME: reuse it if READY, `start` it if STOPPED, `delete` and
#      `create` it again if PREEMPTED/TERMINATED, `create` it if it does not exist.
#   2. Pack this checkout (tracked files, and untracked ones .gitignore does not exclude), `scp` it
#      to every worker (--worker=all), unpack it to ~/qdc_jax and install it into ~/qdc_venv
#      (`pip install -e . 'jax[tpu]'`, redone only when setup.py changed).
#   3. Start `python -m qdc_jax.main --config=CONFIG --workdir=WORKDIR --distributed OVERRIDES` on
#      every worker in the background (nohup; log ~/qdc_jax_job.log, pid ~/qdc_jax_job.pid).
#   4. Stream worker 0's log. Ctrl-C stops the stream only: the job goes on. The stream ends
#      when the job on worker 0 ends.
#
# Re-running the same command: reuses the VM and, if the job is still running, only attaches to
# its log; otherwise copies the code again and starts the job, which resumes from the last
# checkpoint in WORKDIR. After a preemption the same command recreates the VM and resumes.
# WORKDIR must be a gs:// path on a multi-host slice (a local folder is per host, and is lost
# with the VM).
#
# FLAGS (before NAME):
#   --dry_run              print every gcloud command, one per line; run nothing (no gcloud needed)
#   --project=PROJECT      gcloud project (default: gcloud's configured project)
#   --version=VERSION      TPU software version (default: $TPU_SOFTWARE_VERSION, else by
#                          accelerator: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                          v5e/v5litepod v2-alpha-tpuv5-lite, older tpu-ubuntu2204-base)
#   --spot | --preemptible create a Spot / preemptible VM (re-run after a preemption)
#   --create_flag=FLAG     extra flag for `create`, repeatable (--create_flag=--reserved,
#                          --create_flag=--service-account=SA, ...)
#   --env=KEY=VALUE        environment variable for the job, repeatable (LIBTPU_INIT_ARGS=...)
#   --allow_local_workdir  accept a non-gs:// WORKDIR on a multi-host slice (a shared mount)
#   --restart              stop a running job first, then copy, install and start again
#   --detach               start the job and return without streaming its log
#   --attach               only stream worker 0's log        } these two take the same arguments
#   --stop                 stop the job on every worker      } (only NAME and ZONE are used)
#   -h | --help            print this header
#
# With several workers, gcloud asks for the key to be in ssh-agent:
#   ssh-add ~/.ssh/google_compute_engine
# Delete the VM when done: gcloud compute tpus tpu-vm delete NAME --zone=ZONE
set -euo pipefail

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { printf 'tpu_vm.sh: %s\n' "$*" >&2; exit 2; }

dry_run=0 project="" version=${TPU_SOFTWARE_VERSION:-} provisioning="" allow_local=0
mode=run restart=0 detach=0
create_flags=() envs=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run | --dry-run) dry_run=1 ;;
    --project=*) project=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --spot) provisioning=--spot ;;
    --preemptible) provisioning=--preemptible ;;
    --create_flag=*) create_flags+=("${1#*=}") ;;
    --env=*) envs+=("${1#*=}") ;;
    --allow_local_workdir) allow_local=1 ;;
    --restart) restart=1 ;;
    --detach) detach=1 ;;
    --attach) mode=attach ;;
    --stop) mode=stop ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown flag $1 (flags go before NAME; see --help)" ;;
    *) break ;;
  esac
  shift
done

if [ "$mode" = run ]; then
  [ $# -ge 5 ] || die "usage: launch/tpu_vm.sh [FLAGS] NAME ZONE ACCELERATOR CONFIG WORKDIR" \
    "[--config.x=y ...] (see --help)"
  name=$1 zone=$2 accel=$3 config=$4 workdir=$5
  shift 5
else
  [ $# -ge 2 ] || die "usage: launch/tpu_vm.sh --$mode NAME ZONE [...] (see --help)"
  name=$1 zone=$2
  shift $#
fi
overrides=("$@")

# --- quoting: every printed command is one line a POSIX shell (or shlex) reads back as is ---
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; return; fi
  local s=$1 out="'"
  while [[ $s == *"'"* ]]; do out+="${s%%"'"*}'\\''"; s=${s#*"'"}; done
  printf '%s' "$out$s'"
}
qcmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

exec 3>&1  # commands and notes go to the original stdout (or stderr) even inside $(...)
show() {
  if [ "$dry_run" = 1 ]; then printf '%s\n' "$(qcmd "$@")" >&3; else printf '+ %s\n' "$(qcmd "$@")" >&2; fi
}
run() { show "$@"; if [ "$dry_run" = 0 ]; then "$@" 3>&-; fi; }
note() {
  if [ "$dry_run" = 1 ]; then printf '# %s\n' "$*" >&3; else printf 'tpu_vm.sh: %s\n' "$*" >&2; fi
}

if [ "$dry_run" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud SDK (or use --dry_run to see the commands)"
fi

tpu=(gcloud compute tpus tpu-vm)
loc=(--zone="$zone")
if [ -n "$project" ]; then loc+=(--project="$project"); fi

# --- what runs on the workers (one line each; ~ expands there) ---
# shellcheck disable=SC2088,SC2016  # literal ~ and $(...): they expand on the worker, not here
pidf='~/qdc_jax_job.pid' logf='~/qdc_jax_job.log'
# shellcheck disable=SC2016
running_fn='running() { grep -qs qdc_jax.main "/proc/$(cat '"$pidf"' 2>/dev/null || echo 0)/cmdline"; }'
remote_stop="$running_fn; if running; then pid=\$(cat $pidf); \
kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\"; \
for _ in \$(seq 60); do running || break; sleep 1; done; \
if running; then kill -KILL -- \"-\$pid\" 2>/dev/null || kill -KILL \"\$pid\"; sleep 2; fi; \
echo \"\$(hostname): stopped job \$pid\"; else echo \"\$(hostname): no job running\"; fi"
remote_check="$running_fn; if running; then echo \"QDC_JOB_RUNNING \$(hostname)\"; fi"

stream() {  # $1: lines of log history to show first
  note "streaming worker 0's log; Ctrl-C stops the stream, not the job." \
    "Re-attach: launch/tpu_vm.sh --attach $name $zone; stop: launch/tpu_vm.sh --stop $name $zone"
  run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=0 \
    --command="pid=\$(cat $pidf 2>/dev/null || true); tail -n $1 -F \${pid:+--pid=\$pid} $logf"
  if [ "$dry_run" = 0 ]; then
    note "the stream ended: the job on worker 0 ended (its log is above; every worker keeps" \
      "its own in $logf), or the connection broke (--attach re-attaches)"
  fi
}

case $mode in
  attach) stream 200; exit 0 ;;
  stop) run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$remote_stop"; exit 0 ;;
esac

# --- checks before anything runs ---
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$repo/${config%%:*}" ] || die "CONFIG ${config%%:*} is not a file of this checkout" \
  "($repo); give it relative to the checkout's root, e.g. configs/arith_lab.py"
for e in ${envs[@]+"${envs[@]}"}; do
  [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$e: expected --env=KEY=VALUE"
done
# Accelerator types end in the number of TensorCores (v2-v4, v5p) or chips (v5e, v6e); up to 8 is
# one host, more is several. An unknown form counts as several.
suffix=${accel##*-}
multi_host=1
if [[ $suffix =~ ^[0-9]+$ ]] && [ "$suffix" -le 8 ]; then multi_host=0; fi
if [[ $workdir != gs://* ]]; then
  if [ "$multi_host" = 1 ] && [ "$allow_local" = 0 ]; then
    die "WORKDIR $workdir is not a gs:// path. $accel is a multi-host slice: every host would" \
      "write its own local folder, which the other hosts cannot see (and a recreated VM loses)." \
      "Use WORKDIR=gs://BUCKET/PATH, or --allow_local_workdir for a folder shared by all hosts."
  fi
  note "warning: WORKDIR $workdir is on the VM's disk; deleting or losing the VM loses it" \
    "(resume needs a gs:// WORKDIR)"
fi
if [ -z "$version" ]; then
  case $accel in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5e-* | v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    *) version='tpu-ubuntu2204-base' ;;
  esac
fi

# --- 1. the VM ---
vm_state() {  # prints "STATE ACCELERATOR_TYPE", or NOT_FOUND
  show "${tpu[@]}" describe "$name" "${loc[@]}" --format='value(state,acceleratorType)'
  if [ "$dry_run" = 1 ]; then
    # Tests simulate an existing VM with QDC_DRY_RUN_STATE=READY, PREEMPTED, ...
    echo "${QDC_DRY_RUN_STATE:-NOT_FOUND} $accel"
    return
  fi
  local err out
  err=$(mktemp)
  if out=$("${tpu[@]}" describe "$name" "${loc[@]}" --format='value(state,acceleratorType)' \
    2>"$err" 3>&-); then
    rm -f "$err"
    echo "$out"
  elif grep -q NOT_FOUND "$err"; then
    rm -f "$err"
    echo NOT_FOUND
  else
    cat "$err" >&2
    rm -f "$err"
    return 1
  fi
}

create() {
  run "${tpu[@]}" create "$name" "${loc[@]}" --accelerator-type="$accel" --version="$version" \
    ${provisioning:+"$provisioning"} ${create_flags[@]+"${create_flags[@]}"}
}

fresh=1  # the VM is new (or just started): no job can be running on it
waits=0
while :; do
  line=$(vm_state) || die "gcloud describe failed (above); nothing was changed"
  read -r state cur_accel <<<"$line"
  if [ -n "${cur_accel:-}" ] && [ "$state" != NOT_FOUND ] && [ "$cur_accel" != "$accel" ]; then
    die "TPU VM $name exists as $cur_accel, not $accel: use another NAME or delete it first"
  fi
  case $state in
    READY) note "reusing TPU VM $name ($accel, READY)"; fresh=0; break ;;
    NOT_FOUND) create; break ;;
    PREEMPTED | TERMINATED)
      note "TPU VM $name is $state: deleting and creating it again (WORKDIR is kept)"
      run "${tpu[@]}" delete "$name" "${loc[@]}" --quiet
      create
      break ;;
    STOPPED) run "${tpu[@]}" start "$name" "${loc[@]}"; break ;;
    CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | STOPPING | DELETING | UNHIDING)
      note "TPU VM $name is $state: waiting for it"
      if [ "$dry_run" = 1 ]; then fresh=0; break; fi
      waits=$((waits + 1))
      [ "$waits" -le 120 ] || die "TPU VM $name is still $state after an hour"
      sleep 30 ;;
    *) die "TPU VM $name is in state $state; fix it by hand (gcloud compute tpus tpu-vm ...)" ;;
  esac
done

# A reused VM may still run the job: attach to it (or stop it with --restart).
if [ "$fresh" = 0 ]; then
  if [ "$restart" = 1 ]; then
    run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$remote_stop"
  else
    show "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$remote_check"
    if [ "$dry_run" = 1 ]; then
      out=${QDC_DRY_RUN_JOB:+QDC_JOB_RUNNING simulated}
    else
      out=$("${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$remote_check" 3>&-)
    fi
    if grep -q QDC_JOB_RUNNING <<<"$out"; then
      note "the job is still running on $(grep -c QDC_JOB_RUNNING <<<"$out") worker(s): attaching" \
        "to it (--restart to restart it; it resumes from WORKDIR)"
      stream 200
      exit 0
    fi
  fi
fi

# --- 2. code and install ---
if [ "$dry_run" = 1 ]; then
  tgz=${TMPDIR:-/tmp}/qdc_jax-$name.tgz
else
  tgz=$(mktemp "${TMPDIR:-/tmp}/qdc_jax-XXXXXX")
  trap 'rm -f "$tgz"' EXIT
fi
note "packing $repo into $tgz"
if [ "$dry_run" = 0 ]; then
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [ -e "$repo/$f" ]; then printf '%s\0' "$f"; fi; done |
      COPYFILE_DISABLE=1 tar -C "$repo" --null -T - -czf "$tgz"
  else
    COPYFILE_DISABLE=1 tar -C "$repo" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude='./workdir*' -czf "$tgz" .
  fi
fi
run "${tpu[@]}" scp "$tgz" "$name":qdc_jax.tgz "${loc[@]}" --worker=all
remote_install="set -e; $running_fn; \
if running; then echo \"\$(hostname): the job is running; code and venv left as they are\"; exit 0; fi; \
rm -rf ~/qdc_jax; mkdir -p ~/qdc_jax; tar -C ~/qdc_jax -xzf ~/qdc_jax.tgz; \
if [ ! -x ~/qdc_venv/bin/pip ]; then rm -rf ~/qdc_venv; python3 -m venv ~/qdc_venv || { rm -rf ~/qdc_venv; \
sudo apt-get -qq update; sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3-venv; \
python3 -m venv ~/qdc_venv; }; fi; \
. ~/qdc_venv/bin/activate; \
if ! cmp -s ~/qdc_jax/setup.py ~/qdc_venv/qdc_jax_setup.py; then pip install -q -U pip; \
pip install -q -e ~/qdc_jax 'jax[tpu]'; cp ~/qdc_jax/setup.py ~/qdc_venv/qdc_jax_setup.py; fi; \
echo \"\$(hostname): installed\""
run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$remote_install"

# --- 3. the job, on every worker ---
exports="export PYTHONUNBUFFERED=1;"
for e in ${envs[@]+"${envs[@]}"}; do exports+=" export $(q "$e");"; done
job=$(qcmd python -m qdc_jax.main --config="$config" --workdir="$workdir" --distributed \
  ${overrides[@]+"${overrides[@]}"})
remote_start="set -e; $running_fn; \
if running; then echo \"\$(hostname): the job is already running (pid \$(cat $pidf))\"; exit 0; fi; \
cd ~/qdc_jax; . ~/qdc_venv/bin/activate; $exports \
if [ -f $logf ]; then mv $logf $logf.prev; fi; \
setsid nohup $job > $logf 2>&1 < /dev/null & echo \$! > $pidf; \
echo \"\$(hostname): started the job (pid \$!), log $logf\""
run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all --command="$remote_start"

# --- 4. worker 0's log ---
if [ "$detach" = 1 ]; then
  note "the job runs on every worker. Its log: launch/tpu_vm.sh --attach $name $zone"
  exit 0
fi
stream +1
