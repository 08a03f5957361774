"""launch/tpu_vm.sh: the gcloud commands it prints with --dry_run, and a run against a fake gcloud
whose workers are local folders (so the remote shell lines really run). No JAX, no network."""
import os
import shlex
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_vm.sh")
CONFIG = "configs/arith_lab.py"
OVERRIDES = ["--config.mesh.shape=(-1,1,4)", "--config.name=it's a $HOME `x` \"y\""]
BASE = ["qdc-v4", "us-central2-b", "v4-32", CONFIG, "gs://bucket/run1"]


@pytest.fixture
def no_gcloud(tmp_path):
  """A PATH whose gcloud fails loudly: --dry_run must not call it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!/bin/sh\ntouch {tmp_path}/gcloud_was_called\nexit 99\n")
  fake.chmod(0o755)
  yield str(bin_dir) + os.pathsep + os.environ["PATH"]
  assert not (tmp_path / "gcloud_was_called").exists(), "--dry_run ran gcloud"


def dry(path, *args, **env):
  e = dict(os.environ, PATH=path)
  e.pop("TPU_SOFTWARE_VERSION", None)
  e.update(env)
  p = subprocess.run(["bash", SCRIPT, "--dry_run", *args], capture_output=True, text=True,
                     env=e, timeout=60)
  cmds = [shlex.split(l) for l in p.stdout.splitlines() if l.startswith("gcloud ")]
  return p, cmds


def verbs(cmds):
  return [c[4] for c in cmds]


def flag(cmd, name):
  vals = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(vals) == 1, (name, cmd)
  return vals[0]


def job_argv(cmds):
  """The python command line inside the start command (the one that runs qdc_jax.main)."""
  starts = [c for c in cmds if c[4] == "ssh" and "qdc_jax.main --" in flag(c, "--command")]
  assert len(starts) == 1, cmds
  assert flag(starts[0], "--worker") == "all"
  words = shlex.split(flag(starts[0], "--command"))
  i = words.index("python")
  return words[i:words.index(">", i)]


def test_dry_run_fresh_slice(no_gcloud):
  p, cmds = dry(no_gcloud, "--spot", *BASE, *OVERRIDES)
  assert p.returncode == 0, p.stderr
  # Every printed line that is not a note is a gcloud command.
  assert all(l.startswith(("gcloud ", "# ")) for l in p.stdout.splitlines()), p.stdout
  assert verbs(cmds) == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in cmds)
  assert all(c[5] == "qdc-v4" for c in cmds if c[4] != "scp")
  create = cmds[1]
  assert flag(create, "--zone") == "us-central2-b"
  assert flag(create, "--accelerator-type") == "v4-32"
  assert flag(create, "--version") == "tpu-ubuntu2204-base"
  assert "--spot" in create
  scp, install = cmds[2], cmds[3]
  assert flag(scp, "--worker") == "all" and scp[5].endswith(".tgz") and scp[6] == "qdc-v4:qdc_jax.tgz"
  assert flag(install, "--worker") == "all"
  assert "pip install -q -e ~/qdc_jax 'jax[tpu]'" in flag(install, "--command")
  # The job: the same line on every worker, overrides intact after two rounds of shell quoting.
  assert job_argv(cmds) == ["python", "-m", "qdc_jax.main", f"--config={CONFIG}",
                            "--workdir=gs://bucket/run1", "--distributed", *OVERRIDES]
  assert ("python -m qdc_jax.main --config=configs/arith_lab.py --workdir=gs://bucket/run1 "
          "--distributed") in p.stdout
  assert "nohup" in flag(cmds[4], "--command")
  stream = cmds[5]
  assert flag(stream, "--worker") == "0" and "tail" in flag(stream, "--command")
  assert "Ctrl-C stops the stream, not the job" in p.stdout


@pytest.mark.parametrize("accel,version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-16", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_software_version_by_accelerator(no_gcloud, accel, version):
  _, cmds = dry(no_gcloud, "qdc", "zone-a", accel, CONFIG, "gs://b/r")
  assert flag(cmds[1], "--version") == version
  _, cmds = dry(no_gcloud, "qdc", "zone-a", accel, CONFIG, "gs://b/r", TPU_SOFTWARE_VERSION="env-v")
  assert flag(cmds[1], "--version") == "env-v"
  _, cmds = dry(no_gcloud, "--version=flag-v", "qdc", "zone-a", accel, CONFIG, "gs://b/r",
                TPU_SOFTWARE_VERSION="env-v")
  assert flag(cmds[1], "--version") == "flag-v"


def test_project_preemptible_create_flags_and_env(no_gcloud):
  p, cmds = dry(no_gcloud, "--project=my-proj", "--preemptible", "--create_flag=--reserved",
                "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b", *BASE)
  assert p.returncode == 0, p.stderr
  assert all(flag(c, "--project") == "my-proj" for c in cmds)
  assert "--preemptible" in cmds[1] and "--reserved" in cmds[1] and "--spot" not in cmds[1]
  start = shlex.split(flag(cmds[4], "--command"))
  assert "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b;" in start


def test_rerun_reuses_a_ready_vm(no_gcloud):
  # Job no longer running: copy, install and start again (it resumes from the workdir).
  p, cmds = dry(no_gcloud, *BASE, QDC_DRY_RUN_STATE="READY")
  assert p.returncode == 0, p.stderr
  assert verbs(cmds) == ["describe", "ssh", "scp", "ssh", "ssh", "ssh"]
  assert "QDC_JOB_RUNNING" in flag(cmds[1], "--command")
  assert job_argv(cmds)[-1] == "--distributed"
  # Job still running: only attach to worker 0's log.
  p, cmds = dry(no_gcloud, *BASE, QDC_DRY_RUN_STATE="READY", QDC_DRY_RUN_JOB="1")
  assert verbs(cmds) == ["describe", "ssh", "ssh"]
  assert flag(cmds[2], "--worker") == "0" and "tail" in flag(cmds[2], "--command")
  # --restart stops it on every worker, then starts it again.
  p, cmds = dry(no_gcloud, "--restart", *BASE, QDC_DRY_RUN_STATE="READY", QDC_DRY_RUN_JOB="1")
  assert verbs(cmds) == ["describe", "ssh", "scp", "ssh", "ssh", "ssh"]
  assert "kill -TERM" in flag(cmds[1], "--command") and flag(cmds[1], "--worker") == "all"


@pytest.mark.parametrize("state,expected", [
    ("PREEMPTED", ["describe", "delete", "create"]), ("TERMINATED", ["describe", "delete", "create"]),
    ("STOPPED", ["describe", "start"])])
def test_rerun_after_preemption_recreates_the_vm(no_gcloud, state, expected):
  p, cmds = dry(no_gcloud, "--spot", *BASE, QDC_DRY_RUN_STATE=state)
  assert p.returncode == 0, p.stderr
  assert verbs(cmds) == expected + ["scp", "ssh", "ssh", "ssh"]
  assert "--quiet" in cmds[1] or state == "STOPPED"
  assert flag(job_argv(cmds), "--workdir") == "gs://bucket/run1"


def test_local_workdir_rejected_on_a_multi_host_slice(no_gcloud):
  p, cmds = dry(no_gcloud, "qdc", "zone-a", "v4-32", CONFIG, "/tmp/run1")
  assert p.returncode != 0 and not cmds
  assert "gs://" in p.stderr and "multi-host" in p.stderr and "--allow_local_workdir" in p.stderr
  p, cmds = dry(no_gcloud, "--allow_local_workdir", "qdc", "zone-a", "v4-32", CONFIG, "/mnt/nfs/r")
  assert p.returncode == 0 and flag(job_argv(cmds), "--workdir") == "/mnt/nfs/r"
  p, cmds = dry(no_gcloud, "qdc", "zone-a", "v4-8", CONFIG, "/tmp/run1")  # one host: a warning
  assert p.returncode == 0 and "warning" in p.stdout and verbs(cmds)[:2] == ["describe", "create"]


def test_usage_errors(no_gcloud):
  p, _ = dry(no_gcloud, "qdc", "zone-a", "v4-32", "configs/nope.py", "gs://b/r")
  assert p.returncode != 0 and "configs/nope.py" in p.stderr
  p, _ = dry(no_gcloud, "--bogus", *BASE)
  assert p.returncode != 0 and "--bogus" in p.stderr
  p, _ = dry(no_gcloud, "qdc", "zone-a")
  assert p.returncode != 0 and "usage" in p.stderr
  p = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
  assert p.returncode == 0 and "--dry_run" in p.stdout and "gs://" in p.stdout


def test_attach_and_stop(no_gcloud):
  p, cmds = dry(no_gcloud, "--attach", *BASE)
  assert p.returncode == 0 and verbs(cmds) == ["ssh"] and flag(cmds[0], "--worker") == "0"
  p, cmds = dry(no_gcloud, "--stop", "qdc-v4", "us-central2-b")
  assert p.returncode == 0 and verbs(cmds) == ["ssh"] and flag(cmds[0], "--worker") == "all"
  assert "kill -TERM" in flag(cmds[0], "--command")


def test_shell_syntax_and_shellcheck():
  subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  p = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stdout


# --- the same script against a fake gcloud: two workers, each a local HOME folder ---

FAKE_GCLOUD = textwrap.dedent(r"""
  #!/usr/bin/env bash
  # Fake `gcloud compute tpus tpu-vm`: the VM is $FAKE/state, worker i is the folder $FAKE/wi.
  set -euo pipefail
  printf '%s\n' "$*" >> "$FAKE/calls"
  shift 3; verb=$1; shift
  worker=0 command=""
  for a in "$@"; do
    case $a in --worker=*) worker=${a#*=} ;; --command=*) command=${a#*=} ;; esac
  done
  if [ "$worker" = all ]; then workers="w0 w1"; else workers=w$worker; fi
  case $verb in
    describe)
      if [ ! -f "$FAKE/state" ]; then echo "ERROR: NOT_FOUND: node was not found" >&2; exit 1; fi
      printf '%s\t%s\n' "$(cat "$FAKE/state")" "$(cat "$FAKE/accel")" ;;
    create)
      for a in "$@"; do case $a in --accelerator-type=*) echo "${a#*=}" > "$FAKE/accel" ;; esac; done
      echo READY > "$FAKE/state" ;;
    delete) rm -f "$FAKE/state" ;;
    scp) for w in $workers; do cp "$1" "$FAKE/$w/${2#*:}"; done ;;
    ssh) for w in $workers; do HOME=$FAKE/$w bash -c "$command"; done ;;
  esac
""").lstrip()

FAKE_VENV_PYTHON = textwrap.dedent("""
  #!/usr/bin/env bash
  printf '%s\\n' "$@" > "$HOME/job_args"
  printf '%s' "$QDC_TEST_ENV" > "$HOME/job_env"
  echo "fake job on $HOME: $*"
  sleep "${FAKE_JOB_S:-0}"
  echo "fake job done"
""").lstrip()


@pytest.fixture
def fake(tmp_path):
  """A small checkout (git), a fake gcloud, and two workers with a ready venv."""
  if shutil.which("git") is None or shutil.which("setsid") is None:
    pytest.skip("needs git and setsid")
  root = tmp_path / "fake"
  (root / "bin").mkdir(parents=True)
  gcloud = root / "bin" / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  (repo / "configs").mkdir()
  shutil.copy(SCRIPT, repo / "launch" / "tpu_vm.sh")
  shutil.copy(os.path.join(REPO, "setup.py"), repo / "setup.py")
  (repo / "configs" / "arith_lab.py").write_text("# config\n")
  (repo / "gone.py").write_text("")
  (repo / ".gitignore").write_text("ignored/\n")
  git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
  subprocess.run(git + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-qm", "x"], check=True)
  (repo / "gone.py").unlink()  # tracked but deleted: not packed
  (repo / "untracked.py").write_text("")  # packed
  (repo / "ignored").mkdir()
  (repo / "ignored" / "big.bin").write_text("")  # not packed
  for w in ("w0", "w1"):
    venv = root / w / "qdc_venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    for exe, text in (("pip", 'echo "$*" >> "$HOME/pip_calls"\n'), ("python", FAKE_VENV_PYTHON)):
      (venv / "bin" / exe).write_text("#!/usr/bin/env bash\n" + text if exe == "pip" else text)
      (venv / "bin" / exe).chmod(0o755)
    shutil.copy(os.path.join(REPO, "setup.py"), venv / "qdc_jax_setup.py")  # installed already
  env = dict(os.environ, FAKE=str(root), PATH=f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
  env.pop("TPU_SOFTWARE_VERSION", None)

  def launch(*args, **extra):
    return subprocess.run(["bash", str(repo / "launch" / "tpu_vm.sh"), *args],
                          capture_output=True, text=True, env=dict(env, **extra), timeout=60)

  launch.root, launch.repo, launch.env = root, repo, env
  yield launch
  for w in ("w0", "w1"):  # end any fake job still running
    pidf = root / w / "qdc_jax_job.pid"
    if pidf.exists():
      subprocess.run(["kill", "-KILL", "--", "-" + pidf.read_text().strip()], capture_output=True)


def calls(fake):
  text = (fake.root / "calls").read_text() if (fake.root / "calls").exists() else ""
  return [l.split()[3] for l in text.splitlines()]


def _as_from_a_terminal():
  """SIGINT as a shell started from a terminal gets it: default action, not blocked. (A test
  process may inherit it blocked or ignored from the libraries loaded before it, and a child
  inherits both, so Ctrl-C would not reach the stream.)"""
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _session_runs(sid: int, name: bytes) -> bool:
  """Whether a process named `name` runs in session `sid` (Linux /proc)."""
  for d in os.listdir("/proc"):
    try:
      with open(f"/proc/{d}/stat", "rb") as f:
        stat = f.read()
    except (OSError, ValueError):
      continue
    comm, rest = stat[stat.index(b"(") + 1:stat.rindex(b")")], stat[stat.rindex(b")") + 2:]
    if comm == name and int(rest.split()[3]) == sid:
      return True
  return False


def test_fake_pod_run_rerun_attach_stop(fake):
  root = fake.root
  # First run: creates the VM, copies, starts on both workers, streams worker 0 until it ends.
  p = fake("--env=QDC_TEST_ENV=a 'b'", *BASE, *OVERRIDES)
  assert p.returncode == 0, p.stderr
  assert calls(fake) == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  assert "fake job done" in p.stdout  # worker 0's log, streamed
  for w in ("w0", "w1"):
    args = (root / w / "job_args").read_text().splitlines()
    assert args == ["-m", "qdc_jax.main", f"--config={CONFIG}", "--workdir=gs://bucket/run1",
                    "--distributed", *OVERRIDES]
    assert (root / w / "job_env").read_text() == "a 'b'"
    tree = root / w / "qdc_jax"
    assert (tree / CONFIG).exists() and (tree / "untracked.py").exists()
    assert not (tree / "gone.py").exists() and not (tree / "ignored").exists()
    assert not (root / w / "pip_calls").exists()  # setup.py unchanged: no reinstall
  # Re-run while the job runs: the VM is reused and the script attaches instead of starting.
  (root / "calls").unlink()
  p = fake("--detach", *BASE, FAKE_JOB_S="60")
  assert p.returncode == 0, p.stderr
  assert calls(fake) == ["describe", "ssh", "scp", "ssh", "ssh"]
  pid0 = (root / "w0" / "qdc_jax_job.pid").read_text().strip()
  (root / "calls").unlink()
  proc = subprocess.Popen(["bash", str(fake.repo / "launch" / "tpu_vm.sh"), *BASE],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=fake.env, start_new_session=True, preexec_fn=_as_from_a_terminal)
  deadline = time.time() + 30
  while time.time() < deadline and calls(fake) != ["describe", "ssh", "ssh"]:
    time.sleep(0.2)
  assert calls(fake) == ["describe", "ssh", "ssh"]  # describe, is-it-running, tail
  # The fake ssh logs a call before it runs it: Ctrl-C once `tail` itself runs (a signal
  # that lands before would leave a tail -F nobody stops, under load).
  while time.time() < deadline and not _session_runs(proc.pid, b"tail"):
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on the stream ...
  proc.communicate(timeout=30)
  assert (root / "w0" / "qdc_jax_job.pid").read_text().strip() == pid0
  assert os.path.exists(f"/proc/{pid0}")  # ... leaves the job running
  # --stop ends it on every worker.
  p = fake("--stop", "qdc-v4", "us-central2-b")
  assert p.returncode == 0, p.stderr
  assert p.stdout.count("stopped job") == 2
  # A changed setup.py reinstalls; a preempted VM is deleted and created again.
  (fake.repo / "setup.py").write_text((fake.repo / "setup.py").read_text() + "\n# changed\n")
  (root / "state").write_text("PREEMPTED\n")
  (root / "calls").unlink()
  p = fake("--detach", *BASE)
  assert p.returncode == 0, p.stderr
  assert calls(fake) == ["describe", "delete", "create", "scp", "ssh", "ssh"]
  assert "-q -e" in (root / "w1" / "pip_calls").read_text()
  assert "jax[tpu]" in (root / "w1" / "pip_calls").read_text()


def test_fake_existing_vm_with_other_accelerator(fake):
  (fake.root / "state").write_text("READY\n")
  (fake.root / "accel").write_text("v4-8\n")
  p = fake(*BASE)
  assert p.returncode != 0 and "v4-8" in p.stderr and calls(fake) == ["describe"]
