"""Multi-controller JAX on localhost: 2 processes x 4 CPU devices against 1 process x 8.

Every experiment's smoke config runs once as a 2-process job (gloo collectives between the
processes, `jax.distributed.initialize` from the entry point's flags) and once in one process
with 8 devices, on the same (data=2, fsdp=2, tensor=2) mesh; the data axis spans the two
processes. What comes from a fixed model (SPARQ archives, rollouts, evaluation results, counts)
must be exactly equal; what comes after training steps agrees within TRAIN_RTOL (the reductions
across processes may round differently in the last bits).

The 2-process job runs all six configs one after the other and is SIGKILLed twice: one
process dies in SPARQ's round 1, and, after the re-launch, in EI's round 1. Each time the
survivor must exit non-zero within a bounded time, and the re-launch must go on with nothing
lost or duplicated; what the third launch finishes with is compared with the single-process
run. (One job instead of one per experiment: process start, distributed start-up and compiles
are most of the time; the re-launches reuse the killed launch's compiles from a persistent
compilation cache.)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "multiprocess_driver.py")
MESH = "(2, 2, 2)"
# One config per distinct multi-host path: SPARQ (archive, kill), EI (sampling + `fit`, kill),
# evaluation, PPO (its own sampler call and update step), RCRL (the token hook) and QDC
# (embeddings). SFT and the lab trainer run `fit` as EI's rounds do; they are left out to
# keep the job inside its 5-minute budget on 2 cores.
SPECS = ["configs/sparq.py:smoke", "configs/ei.py:smoke", "configs/evaluate.py:smoke",
         "configs/ppo.py:smoke", "configs/rcrl.py:smoke", "configs/qdc.py:smoke"]
# Training metrics: f32 sums over 8 devices reduced in another order across processes.
TRAIN_RTOL = 1e-4
# A dead peer must end the survivor within this long (heartbeat 10 s, plus shutdown).
SURVIVOR_DEADLINE_S = 90
TIMING_KEYS = ("seconds", "_s", "per_s", "time")
# Where the 2-process job is killed: in SPARQ's round 1, then (second launch) in EI's round 1.
KILL_POINTS = ((SPECS[0], os.path.join("archive", "round_000001.json")),
               (SPECS[1], os.path.join("round_1", "samples.jsonl")))


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # The environment carries conftest's persistent compilation cache: the re-launches after a
  # kill reuse what the killed launch compiled.
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _launch(args_of, nproc: int, log_dir: str, tag: str):
  """Start `nproc` processes; args_of(i, port) -> argv. Returns (procs, log paths)."""
  port = _port()
  procs, logs = [], []
  for i in range(nproc):
    log = os.path.join(log_dir, f"{tag}_{i}.log")
    env = _env(8 // nproc)
    if nproc > 1:
      env.update(QDC_MP_COORD=f"localhost:{port}", QDC_MP_NPROC=str(nproc), QDC_MP_PID=str(i))
    with open(log, "w") as f:
      procs.append(subprocess.Popen(args_of(i, port), cwd=REPO, env=env, stdout=f,
                                    stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _wait(procs, logs, timeout):
  deadline = time.time() + timeout
  for p, log in zip(procs, logs):
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"timed out; log tail:\n{open(log).read()[-3000:]}") from None
    assert p.returncode == 0, f"exit {p.returncode}; log tail:\n{open(log).read()[-4000:]}"


def _driver(out, specs):
  return lambda i, port: [sys.executable, DRIVER, out, *specs, "--set", f"mesh.shape={MESH}"]


def _main_cmd(spec, workdir):
  def args(i, port):
    return [sys.executable, "-m", "qdc_jax.main", f"--config={spec}", f"--workdir={workdir}",
            f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={i}", "--heartbeat_timeout_s=10", f"--config.mesh.shape={MESH}"]
  return args


def _kill_one(procs, logs, ready):
  """Wait until `ready()`, SIGKILL process 1; the survivor must fail fast. Seconds it took."""
  deadline = time.time() + 1500
  while not ready():
    assert time.time() < deadline, open(logs[0]).read()[-3000:]
    assert procs[0].poll() is None, f"finished before the kill:\n{open(logs[0]).read()[-2000:]}"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  t0 = time.time()
  try:
    procs[0].wait(timeout=SURVIVOR_DEADLINE_S)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    raise AssertionError(f"survivor still running {SURVIVOR_DEADLINE_S}s after its peer died")
  assert procs[0].returncode != 0, open(logs[0]).read()[-2000:]
  return time.time() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(single-process out dir, 2-process out dir, root, {spec: seconds the survivor of the kill
  in that spec took to exit}). The single-process run goes alongside the 2-process launches."""
  root = tmp_path_factory.mktemp("mp")
  one, two = str(root / "one"), str(root / "two")
  p1, l1 = _launch(_driver(one, SPECS), 1, str(root), "one")
  waited = {}
  for n, (spec, marker) in enumerate(KILL_POINTS):
    procs, logs = _launch(_driver(two, SPECS), 2, str(root), f"two{n}")
    waited[spec] = _kill_one(procs, logs, lambda: os.path.exists(
        os.path.join(_workdir(two, spec), marker)))
  procs, logs = _launch(_driver(two, SPECS), 2, str(root), "two_last")
  _wait(p1 + procs, l1 + logs, timeout=2400)
  return one, two, str(root), waited


def _workdir(root, spec):
  return os.path.join(root, os.path.basename(spec).replace(".py", "").replace(":", "_"))


def _strip_timing(x):
  if isinstance(x, dict):
    return {k: _strip_timing(v) for k, v in x.items()
            if not any(k == t or k.endswith(t) for t in TIMING_KEYS)}
  if isinstance(x, list):
    return [_strip_timing(v) for v in x]
  return x


def _json(path):
  with open(path) as f:
    return _strip_timing(json.load(f))


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _rows(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _close_metrics(a_path, b_path, keys=("loss",)):
  a, b = _rows(a_path), _rows(b_path)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  assert a, a_path
  for ra, rb in zip(a, b):
    for k in keys:
      if k in ra:
        np.testing.assert_allclose(rb[k], ra[k], rtol=TRAIN_RTOL, err_msg=f"{b_path} {k}")


def test_sparq_archive_and_evaluation_equal(runs):
  one, two, _, _ = runs
  a, b = _workdir(one, SPECS[0]), _workdir(two, SPECS[0])
  names = sorted(os.listdir(os.path.join(a, "archive")))
  assert names == sorted(os.listdir(os.path.join(b, "archive")))
  assert any(n.endswith(".jsonl") and n != "round_000000.jsonl" for n in names)
  for n in names:  # every round's items and commit record (strategy state, stats) byte-equal
    rec_a, rec_b = _bytes(os.path.join(a, "archive", n)), _bytes(os.path.join(b, "archive", n))
    if n.endswith(".json"):
      assert _strip_timing(json.loads(rec_a)) == _strip_timing(json.loads(rec_b)), n
    else:
      assert rec_a == rec_b, n
  assert _json(os.path.join(a, "eval_baseline.json")) == _json(
      os.path.join(b, "eval_baseline.json"))
  distill = [d for d in os.listdir(a) if d.startswith("distill_")]
  assert distill and distill == [d for d in os.listdir(b) if d.startswith("distill_")]
  _close_metrics(os.path.join(a, distill[0], "distill_metrics.jsonl"),
                 os.path.join(b, distill[0], "distill_metrics.jsonl"))
  ra, rb = _json(os.path.join(a, "report.json")), _json(os.path.join(b, "report.json"))
  assert ra["archive"] == rb["archive"] and ra["num_training_pairs"] == rb[
      "num_training_pairs"]


def test_ei_rollouts_equal_and_training_close(runs):
  one, two, _, _ = runs
  a, b = _workdir(one, SPECS[1]), _workdir(two, SPECS[1])
  assert _json(os.path.join(a, "round_0", "done.json")) == _json(
      os.path.join(b, "round_0", "done.json"))
  # Round 1 samples from the fixed base: exactly equal. Round 2 samples from a trained model.
  assert _bytes(os.path.join(a, "round_1", "samples.jsonl")) == _bytes(
      os.path.join(b, "round_1", "samples.jsonl"))
  assert _bytes(os.path.join(a, "round_1", "dataset.jsonl")) == _bytes(
      os.path.join(b, "round_1", "dataset.jsonl"))
  _close_metrics(os.path.join(a, "round_1", "train_metrics.jsonl"),
                 os.path.join(b, "round_1", "train_metrics.jsonl"))
  ra, rb = _json(os.path.join(a, "rl_report.json")), _json(os.path.join(b, "rl_report.json"))
  assert [r["rollouts"] for r in ra["curve"]] == [r["rollouts"] for r in rb["curve"]]
  assert ra["curve"][:2] == rb["curve"][:2]  # rounds 0 and 1 evaluate fixed params
  assert ra["notes"]["dataset_size"] == rb["notes"]["dataset_size"]


def test_evaluate_equal(runs):
  one, two, _, _ = runs
  assert _json(os.path.join(_workdir(one, SPECS[2]), "eval_report.json")) == _json(
      os.path.join(_workdir(two, SPECS[2]), "eval_report.json"))
  assert _json(os.path.join(_workdir(one, SPECS[2]), "eval_examples.json")) == _json(
      os.path.join(_workdir(two, SPECS[2]), "eval_examples.json"))


def test_ppo_first_rollouts_equal_and_training_close(runs):
  one, two, _, _ = runs
  a = _rows(os.path.join(_workdir(one, SPECS[3]), "ppo_metrics.jsonl"))
  b = _rows(os.path.join(_workdir(two, SPECS[3]), "ppo_metrics.jsonl"))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  # Step 0 evaluates the initial policy and the first iteration's rewards come from it.
  assert _strip_timing(a[0]) == _strip_timing(b[0])
  for ra, rb in zip(a[1:], b[1:]):
    for k in ra:
      if k.startswith(("reward", "loss", "kl")) and k in rb:
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_rcrl_rollout_labels_equal(runs):
  one, two, _, _ = runs
  a, b = _workdir(one, SPECS[4]), _workdir(two, SPECS[4])
  assert _bytes(os.path.join(a, "rcrl_data.jsonl")) == _bytes(
      os.path.join(b, "rcrl_data.jsonl"))
  assert _bytes(os.path.join(a, "rcrl_train.jsonl")) == _bytes(
      os.path.join(b, "rcrl_train.jsonl"))
  _close_metrics(os.path.join(a, "rcrl_metrics.jsonl"), os.path.join(b, "rcrl_metrics.jsonl"))


def _close_tree(a, b, where=""):
  """Equal JSON trees, floats within 1e-5 (embeddings are reduced across processes)."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), where
    for k in a:
      _close_tree(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _close_tree(x, y, f"{where}[{i}]")
  elif isinstance(a, float):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=where)
  else:
    assert a == b, where


def test_qdc_measures_equal(runs):
  one, two, _, _ = runs
  spec = "configs/qdc.py:smoke"
  ra = _json(os.path.join(_workdir(one, spec), "report.json"))
  rb = _json(os.path.join(_workdir(two, spec), "report.json"))
  assert set(ra["datasets"]) == {"lab_in_dist_24", "lab_ood_24"}
  for name in ra["datasets"]:  # the student's rollouts exactly; embedding measures closely
    assert ra["datasets"][name]["measures"]["student_solve_rate"] == rb["datasets"][name][
        "measures"]["student_solve_rate"]
  _close_tree(ra, rb)


def test_sparq_killed_process_fails_fast_and_resumes_exactly(runs):
  workdir, ref = _workdir(runs[1], SPECS[0]), _workdir(runs[0], SPECS[0])
  assert runs[3][SPECS[0]] < SURVIVOR_DEADLINE_S
  for n in sorted(os.listdir(os.path.join(ref, "archive"))):
    got, want = (_bytes(os.path.join(d, "archive", n)) for d in (workdir, ref))
    if n.endswith(".json"):
      assert _strip_timing(json.loads(got)) == _strip_timing(json.loads(want)), n
    else:
      assert got == want, n  # nothing lost, nothing duplicated
  assert sorted(os.listdir(os.path.join(workdir, "archive"))) == sorted(
      os.listdir(os.path.join(ref, "archive")))
  rounds = [r["step"] for r in _rows(os.path.join(workdir, "sparq_metrics.jsonl"))]
  assert rounds == sorted(set(rounds)), rounds  # each round logged once
  assert _json(os.path.join(workdir, "eval_baseline.json")) == _json(
      os.path.join(ref, "eval_baseline.json"))


def test_ei_killed_process_fails_fast_and_resumes_exactly(runs):
  workdir, ref = _workdir(runs[1], SPECS[1]), _workdir(runs[0], SPECS[1])
  assert runs[3][SPECS[1]] < SURVIVOR_DEADLINE_S
  for f in ("round_0/done.json", "round_1/samples.jsonl", "round_1/dataset.jsonl"):
    got, want = (os.path.join(d, f) for d in (workdir, ref))
    if f.endswith(".json"):
      assert _json(got) == _json(want), f
    else:
      assert _bytes(got) == _bytes(want), f
  rounds = [r["step"] for r in _rows(os.path.join(workdir, "ei_metrics.jsonl"))]
  assert rounds == sorted(set(rounds)), rounds
  assert os.path.exists(os.path.join(workdir, "model", "model.json"))


# ------------------------------------------------------------------------ bad input, 2 hosts


def _fail_fast(tmp_path, args_of, tag):
  """A 2-process qdc_jax.main that must fail on both processes; their logs."""
  procs, logs = _launch(args_of, 2, str(tmp_path), tag)
  for p in procs:
    try:
      p.wait(timeout=120)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError("hung instead of failing") from None
  assert all(p.returncode != 0 for p in procs), [open(l).read()[-2000:] for l in logs]
  return [open(l).read() for l in logs]


def test_workdir_other_processes_cannot_see(tmp_path):
  # Each "host" gets its own local folder under the same name, as /tmp on two machines.
  def args(i, port):
    return _main_cmd("configs/evaluate.py:smoke", str(tmp_path / f"host{i}" / "run"))(i, port)
  for log in _fail_fast(tmp_path, args, "unshared"):
    assert "is not shared: process(es) [1] cannot see what process 0 wrote there" in log
    assert "gs:// bucket path or a shared filesystem" in log


def test_mesh_that_does_not_fit_the_processes(tmp_path):
  def args(i, port):
    argv = _main_cmd("configs/evaluate.py:smoke", str(tmp_path / "run"))(i, port)
    return [a for a in argv if not a.startswith("--config.mesh.shape")] + [
        "--config.mesh.shape=(3, -1, 1)"]
  for log in _fail_fast(tmp_path, args, "mesh"):
    assert ("Mesh shape (3, -1, 1) does not divide the 8 devices (2 processes x 4 local "
            "devices)") in log
