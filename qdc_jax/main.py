r"""Entry point: `python -m qdc_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v]`.

Runs `registry.get("experiment", config.experiment)(config, workdir)`. From Python (a driver
script, a notebook), `run_in_subprocess("configs/X.py:arg", DIR, "--config.a.b=v")` runs the
same command in a fresh process and streams its log.
"""

from __future__ import annotations

import collections
import importlib.util
import logging as py_logging
import os
import subprocess
import sys
import time
from typing import IO, Mapping, Optional

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from qdc_jax import registry
from qdc_jax import sharding
from qdc_jax import storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local or gs://): "
                               "checkpoints, metrics, TensorBoard, reports. Re-running on it "
                               "resumes.")
# Multi-controller JAX: the same command runs on every host.
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "auto-detection (TPU VM slices, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0's "
                                   "coordinator, for clusters JAX cannot auto-detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with "
                                   "--coordinator_address).")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", "~/.cache/qdc_jax/jax_compilation_cache",
    "Persistent XLA compilation cache (local or gs://; '' = off). Runs of many small units "
    "(the scaling grid, SPARQ rounds, a resumed job) compile the same programs again; a hit "
    "is the same executable (keyed by program, flags and jax version).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 0, "Seconds after which a dead peer "
                                  "ends the survivors (0 = JAX's default, 100 s).")


def _keys(c, prefix=""):
  out = []
  for k, v in c.items():
    out.append(prefix + k)
    if hasattr(v, "items"):
      out += _keys(v, prefix + k + ".")
  return out


def _check_overrides(argv_all, config) -> None:
  """ml_collections reports unknown override keys with a bare KeyError; say it plainly."""
  valid = set(_keys(config))
  for arg in argv_all:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config."):].split("=", 1)[0]
      if key not in valid:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in valid if k != parent and (
            k.rsplit(".", 1)[0] == parent if parent else "." not in k))
        raise app.UsageError(f"Unknown config key {key!r} in {arg!r}. Valid keys"
                             f"{' under ' + parent if parent else ''}: {', '.join(siblings)}")


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every save phase at INFO; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("Both --config=configs/X.py and --workdir=DIR are required.")
  if "experiment" not in config:
    raise app.UsageError("The config has no `experiment` field; valid experiments: "
                         + ", ".join(registry.names("experiment")))
  try:
    run = registry.get("experiment", config.experiment)
  except KeyError as e:
    raise app.UsageError(e.args[0]) from None
  _use_compilation_cache(_JAX_CACHE.value)
  sharding.initialize_distributed(
      enabled=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      heartbeat_timeout_s=_HEARTBEAT.value)
  workdir = _WORKDIR.value
  check_shared_workdir(workdir)
  storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  logging.info("Experiment %s -> %s (process %d of %d)", config.experiment, workdir,
               jax.process_index(), jax.process_count())
  run(config, workdir)


def _use_compilation_cache(path: str) -> None:
  """Turn on JAX's persistent compilation cache unless the environment already set one."""
  if not path or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  if "://" not in path:
    path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  # The lab's programs compile in well under JAX's default 1 s threshold; cache them all.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def check_shared_workdir(workdir: str) -> None:
  """On several processes the workdir must be one folder they all see (a bucket, NFS):
  process 0 writes a token there and every other process must read it back."""
  if storage.is_writer():
    storage.makedirs(workdir)
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = str(int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % 2**31))))
  probe = storage.join(workdir, ".shared_probe")
  # Barriers named without the path: what a host calls the workdir is what is in question.
  storage.write_text(probe, token, sync=False)  # process 0 only
  storage.barrier("shared-workdir-probe")
  seen = storage.exists(probe) and storage.read_text(probe) == token
  ok = multihost_utils.process_allgather(np.asarray(seen))
  if not np.all(ok):
    missing = [i for i, v in enumerate(np.ravel(ok)) if not v]
    raise app.UsageError(
        f"--workdir={workdir} is not shared: process(es) {missing} cannot see what process 0 "
        f"wrote there. On several hosts use a gs:// bucket path or a shared filesystem.")


class WorkloadError(subprocess.CalledProcessError):
  """A `run_in_subprocess` workload exited non-zero; the message ends with its last log lines."""

  def __str__(self):
    return super().__str__() + " Its last lines:\n" + (self.output or "")


def run_in_subprocess(config: str, workdir: str, *overrides: str, cwd: Optional[str] = None,
                      env: Optional[Mapping[str, str]] = None, out: Optional[IO[str]] = None,
                      tail_lines: int = 40) -> None:
  """`python -m qdc_jax.main --config=CONFIG --workdir=WORKDIR [OVERRIDES...]` in a fresh
  process (its own JAX runtime, flags and devices, as from a shell), with this interpreter.

  Its log (stdout and stderr) is written to `out` (default: sys.stdout, i.e. a notebook cell
  or the caller's log) line by line as it runs.

  Args:
    config: "configs/X.py[:arg]", relative to `cwd` (default: the current directory).
    workdir: --workdir.
    *overrides: further flags, e.g. "--config.train.steps=10".
    cwd, env: of the process (default: this one's).
    out: where the log goes.
    tail_lines: log lines kept for the error.

  Raises:
    WorkloadError (a subprocess.CalledProcessError): a non-zero exit; `output` holds the last
      `tail_lines` lines of the log.
  """
  cmd = [sys.executable, "-m", "qdc_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  out = out or sys.stdout
  tail: collections.deque = collections.deque(maxlen=max(tail_lines, 1))
  with subprocess.Popen(cmd, cwd=cwd, env=None if env is None else dict(env),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        bufsize=1) as proc:
    for line in proc.stdout:
      out.write(line)
      tail.append(line)
    out.flush()
  if proc.returncode:
    raise WorkloadError(proc.returncode, cmd, output="".join(tail))


def _load_config(spec: str):
  """configs/x.py[:arg] -> ConfigDict, as ml_collections' config flag loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_qdc_config", path)
  if module_spec is None or not os.path.exists(path):
    raise app.UsageError(f"Config file not found: {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _entry():
  # Check override keys before absl parses them: its own failure is an opaque traceback.
  argv = sys.argv
  cfg_arg = [a for a in argv if a.startswith("--config=")]
  if cfg_arg and any(a.startswith("--config.") for a in argv):
    try:
      _check_overrides(argv, _load_config(cfg_arg[-1].split("=", 1)[1]))
    except app.UsageError as e:
      print(f"FATAL: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  _entry()
