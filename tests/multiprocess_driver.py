"""Test driver: runs several experiments' configs, one after the other, in one JAX job.

  python tests/multiprocess_driver.py OUT SPEC [SPEC ...] [--set KEY=VALUE ...]
  (env QDC_MP_COORD=host:port, QDC_MP_NPROC, QDC_MP_PID for a multi-process job)

Each SPEC (configs/x.py:arg) runs in OUT/<x>_<arg> through the registry, as qdc_jax.main does
(same distributed start-up and config.json), so one process start and one
`jax.distributed.initialize` serve every experiment; that keeps the 2-process tests in budget.
A finished SPEC leaves OUT/<x>_<arg>/DRIVER_DONE (one writer, then a barrier); a re-launch
after a kill skips those and resumes the one that was running.
"""

import ast
import importlib.util
import os
import sys
import time

from qdc_jax import registry
from qdc_jax import sharding
from qdc_jax import storage


def _load(spec):
  path, _, arg = spec.partition(":")
  s = importlib.util.spec_from_file_location("_cfg", path)
  m = importlib.util.module_from_spec(s)
  s.loader.exec_module(m)
  return m.get_config(arg) if arg else m.get_config()


def main(argv):
  out, specs, sets = argv[0], [], []
  it = iter(argv[1:])
  for a in it:
    if a == "--set":
      sets.append(next(it))
    else:
      specs.append(a)
  if os.environ.get("QDC_MP_COORD"):
    sharding.initialize_distributed(coordinator_address=os.environ["QDC_MP_COORD"],
                                    num_processes=int(os.environ["QDC_MP_NPROC"]),
                                    process_id=int(os.environ["QDC_MP_PID"]),
                                    heartbeat_timeout_s=10)
  for spec in specs:
    t = time.time()
    c = _load(spec)
    for kv in sets:  # KEY=VALUE overrides, Python literals
      key, value = kv.split("=", 1)
      node = c
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = ast.literal_eval(value)
    workdir = os.path.join(out, os.path.basename(spec).replace(".py", "").replace(":", "_"))
    done = os.path.join(workdir, "DRIVER_DONE")
    if storage.exists(done):  # every process sees the same marker: the same calls follow
      continue
    storage.makedirs(workdir)
    registry.get("experiment", c.experiment)(c, workdir)
    storage.write_text(done, f"{time.time() - t:.1f}\n")
    print(f"DONE {spec} {time.time() - t:.1f}s", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
