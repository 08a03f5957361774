"""Training loop: exact resume (params and data order), NaN guard, the CLI front door."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qdc_jax import config_lib, fit
from qdc_jax import sharding as sharding_lib
from qdc_jax.experiments import lm
from qdc_jax.models import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import arith_lab  # pylint: disable=g-import-not-at-top,wrong-import-position


def _setup(**train_overrides):
  config = arith_lab.get_config("smoke")
  for k, v in train_overrides.items():
    if k.startswith("opt_"):
      config.train.opt[k[4:]] = v
    else:
      config.train[k] = v
  tokenizer = lm.make_tokenizer(config.tokenizer)
  train_records, _ = lm.lab_records(config.data)
  model = transformer.Transformer(config_lib.model_config(config.model))
  mesh = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  return config, dict(model=model, train_records=train_records, tokenizer=tokenizer,
                      mesh=mesh, rules=sharding_lib.DEFAULT_RULES)


def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
  config, kw = _setup(steps=20, save_every=5, log_every=5, seed=3)
  full = fit.fit(config.train, workdir=str(tmp_path / "full"), **kw)

  config.train.stop_at_step = 10
  first = fit.fit(config.train, workdir=str(tmp_path / "cut"), **kw)
  assert first.step == 10
  config.train.stop_at_step = -1
  resumed = fit.fit(config.train, workdir=str(tmp_path / "cut"), **kw)
  assert resumed.step == 20
  # Bit-identical: same data order after the restart, same optimiser state.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
               jax.device_get(resumed.params))
  # The metrics file has every logged step exactly once, with the same losses.
  def rows(d):
    with open(tmp_path / d / "train_metrics.jsonl") as f:
      return [json.loads(line) for line in f]
  cut = rows("cut")
  assert [r["step"] for r in cut] == [5, 10, 15, 20]
  assert [r["loss"] for r in cut] == [r["loss"] for r in rows("full")]
  assert glob.glob(str(tmp_path / "cut" / "tb" / "train" / "events.out.tfevents.*"))


def test_resume_with_packing_and_accumulation(tmp_path):
  config, kw = _setup(steps=8, save_every=4, log_every=4, pack=True, accum_steps=2)
  full = fit.fit(config.train, workdir=str(tmp_path / "full"), **kw)
  config.train.stop_at_step = 4
  fit.fit(config.train, workdir=str(tmp_path / "cut"), **kw)
  config.train.stop_at_step = -1
  resumed = fit.fit(config.train, workdir=str(tmp_path / "cut"), **kw)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
               jax.device_get(resumed.params))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # An absurd learning rate (after a zero-lr warm-up step) overflows the weights.
  config, kw = _setup(steps=30, save_every=1, log_every=1, opt_lr=1e30, opt_warmup_steps=1,
                      opt_grad_clip=0.0)
  with pytest.raises(fit.NonFiniteError, match="last good checkpoint is step") as err:
    fit.fit(config.train, workdir=str(tmp_path), **kw)
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints/*"))
                 if os.path.basename(p).isdigit())
  assert steps, "at least the zero-lr first step was saved"
  assert f"step {steps[-1]} " in str(err.value)
  params, _ = fit.load_params(str(tmp_path), model=kw["model"], tc=config.train,
                              mesh=kw["mesh"], rules=kw["rules"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(params)))


def _main(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "qdc_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_run_in_subprocess_streams_the_log_and_raises_with_its_tail(tmp_path):
  import io
  from qdc_jax import main
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  log = io.StringIO()
  with pytest.raises(main.WorkloadError) as e:
    main.run_in_subprocess("configs/arith_lab.py:smoke", str(tmp_path),
                           "--config.train.stepz=3", cwd=REPO, env=env, out=log)
  assert e.value.returncode == 2 and "train.stepz" in log.getvalue()
  assert "train.stepz" in e.value.output and "train.stepz" in str(e.value)
  assert isinstance(e.value, subprocess.CalledProcessError)


def test_cli_unknown_experiment_and_key_exit_nonzero_naming_them(tmp_path):
  bad_key = _main("--config=configs/arith_lab.py:smoke", f"--workdir={tmp_path}",
                  "--config.train.stepz=3")
  assert bad_key.returncode != 0
  assert "train.stepz" in bad_key.stderr and "train.steps" in bad_key.stderr
  bad_exp = _main("--config=configs/arith_lab.py:smoke", f"--workdir={tmp_path}",
                  "--config.experiment=nope")
  assert bad_exp.returncode != 0
  assert "'nope'" in bad_exp.stderr and "lm" in bad_exp.stderr


def test_cli_smoke_run_writes_metrics_tensorboard_and_report(tmp_path):
  res = _main("--config=configs/arith_lab.py:smoke", f"--workdir={tmp_path}",
              "--config.train.steps=4", "--config.model.d_ff=128")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "steps_per_s" in res.stderr and "ETA" in res.stderr
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["steps"] == 4
  assert report["student"]["in_dist"]["num_problems"] == 8
  assert 0.0 <= report["student"]["ood"]["greedy_accuracy"] <= 1.0
  assert report["eval_tokens"] > 0
  assert json.loads((tmp_path / "config.json").read_text())["model"]["d_ff"] == 128
  assert glob.glob(str(tmp_path / "tb" / "train" / "events.out.tfevents.*"))


def test_train_step_compiles_once_per_fit_from_given_params(tmp_path, caplog):
  # On a 2-device mesh a fresh state's scalars must already sit where the step puts them:
  # otherwise step 2 misses the jit cache and compiles the whole step again (minutes on a pod).
  config, kw = _setup(steps=3, save_every=3, log_every=1)
  kw["mesh"] = sharding_lib.make_mesh((2, 1, 1), jax.devices()[:2])
  init = fit.fit(config.train, workdir=str(tmp_path / "base"), **kw).params  # as SFT's base
  caplog.set_level("WARNING", logger="jax._src.dispatch")
  caplog.clear()
  with jax.log_compiles():
    fit.fit(config.train, workdir=str(tmp_path / "run"), init_params=init, **kw)
  # Traces, not compiles: a persistent-cache hit compiles nothing but still traces a miss.
  traces = [r.getMessage() for r in caplog.records
            if "Finished tracing train_step for jit" in r.getMessage()]
  assert len(traces) == 1, traces
