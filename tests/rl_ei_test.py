"""Expert Iteration and SFT: the pure EI functions on hand-made examples, the smoke experiments
end to end (checked against the lab oracle, not against the code under test), and a resume."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from qdc_jax import model_io
from qdc_jax import sampling
from qdc_jax import tokenizers
from qdc_jax.data import answers, arith
from qdc_jax.experiments import ei as ei_exp
from qdc_jax.experiments import sft as sft_exp
from qdc_jax.rl import common
from qdc_jax.rl import ei as ei_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module(name):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


EI_CFG = _config_module("ei")
SFT_CFG = _config_module("sft")


# ---------------------------------------------------------------------------------------------
# Pure functions.

Q1, Q2 = "Question: 3+4\nSolution:\n", "Question: 2*5\nSolution:\n"


def test_correct_flags_use_the_final_answer():
  flags = ei_lib.correct_flags(["7", "10"], [
      ["3+4=7\nThe answer is 7.", "3+4=8\nThe answer is 8.", "3+4=7"],
      ["2*5=10\nThe answer is 10.", "The answer is 10.0"]])
  # No answer line counts as wrong; '10.0' is the same number as 10 (answers.is_correct).
  assert flags == [[True, False, False], [True, True]]


LUCKY = "8 mod 13=2\n23 mod 23=2\n23 mod 23=1\nThe answer is 1."  # right answer, wrong steps


def test_keep_rule_answer_and_steps_drops_lucky_answers():
  good = "78 mod 13=0\nmax(0,23)=23\n23/23=1\nThe answer is 1."
  assert ei_lib.steps_hold(good) and not ei_lib.steps_hold(LUCKY)
  assert not ei_lib.steps_hold("2+2=5\nThe answer is 5.")
  assert ei_lib.correct_flags(["1"], [[good, LUCKY]]) == [[True, True]]  # thesis: answer only
  assert ei_lib.correct_flags(["1"], [[good, LUCKY, "2+2=4\nThe answer is 4."]],
                              keep="answer_and_steps") == [[True, False, False]]
  with pytest.raises(ValueError, match="answer_and_steps"):
    ei_lib.correct_flags(["1"], [[good]], keep="steps")


def test_refit_epochs_count_packed_rows():
  tok = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
  data = [{"prompt": "p" * 20, "completion": "c" * 11}] * 3  # 1 + 20 + 11 + 1 = 33 tokens each
  tc = common.sft_train_section("lab")
  tc.epochs, tc.batch_size, tc.seq_len, tc.pack = 4.0, 2, 64, True
  assert ei_exp.train_config(tc, data, tok).steps == 4  # 99 tokens fill 2 rows: 4 x 2 / 2
  tc.pack = False
  assert ei_exp.train_config(tc, data, tok).steps == 6  # one row per record: 4 x 3 / 2
  tc.epochs = 0.0
  assert ei_exp.train_config(tc, data, tok).steps == tc.steps  # fixed steps stay


def test_correct_records_filter_and_dedupe_whitespace_variants():
  samples = [["3+4=7\nThe answer is 7.",      # correct
              "3+4=7 \nThe answer is  7.",    # the same solution up to whitespace
              "3+4=8\nThe answer is 8.",      # wrong
              "4+3=7\nThe answer is 7.",      # another correct solution
              "  3+4=7\n\nThe answer is 7. "],  # whitespace again
             ["3+4=7\nThe answer is 7."]]     # same text, other question: wrong there
  flags = ei_lib.correct_flags(["7", "10"], samples)
  got = ei_lib.correct_records([Q1, Q2], samples, flags)
  assert got == [{"prompt": Q1, "completion": "3+4=7\nThe answer is 7."},
                 {"prompt": Q1, "completion": "4+3=7\nThe answer is 7."}]
  # The same completion under two different questions is two records.
  both = ei_lib.correct_records([Q1, Q2], [["x\nThe answer is 7."]] * 2, [[True], [True]])
  assert len(both) == 2
  with pytest.raises(ValueError):
    ei_lib.correct_records([Q1], [["a", "b"]], [[True]])


def test_union_keeps_previous_dataset_first_and_drops_repeats():
  prev = [{"prompt": Q1, "completion": "a\nThe answer is 7."},
          {"prompt": Q2, "completion": "b\nThe answer is 10."}]
  new = [{"prompt": Q2, "completion": "b \nThe answer is 10."},  # in D_{i-1} up to spaces
         {"prompt": Q1, "completion": "c\nThe answer is 7."}]
  d = ei_lib.union(prev, new)
  assert d == prev + [new[1]]
  # Solutions found only in an earlier round stay, though this round did not find them.
  assert ei_lib.union(prev, []) == prev
  assert ei_lib.union([], new) == new


@pytest.mark.parametrize("history,min_gain,patience,expected", [
    ([0.1], 0.0, 1, False),  # only the initial policy
    ([0.1, 0.2], 0.0, 1, False),
    ([0.1, 0.2, 0.2], 0.0, 1, True),  # equal is not better
    ([0.1, 0.2, 0.15], 0.0, 1, True),
    ([0.1, 0.2, 0.15], 0.0, 2, False),  # one stale round, patience 2
    ([0.1, 0.2, 0.15, 0.2], 0.0, 2, True),
    ([0.1, 0.2, 0.15, 0.25], 0.0, 2, False),  # improved again
    ([0.1, 0.105], 0.01, 1, True),  # a gain below min_gain does not count
    ([0.1, 0.2], 0.01, 1, False),
    ([0.3, 0.1, 0.2], 0.0, 2, True),  # neither round beat the initial policy
    ([0.1, 0.1], 0.0, 1, True),
])
def test_saturation_rule(history, min_gain, patience, expected):
  assert ei_lib.saturated(history, min_gain=min_gain, patience=patience) is expected


def test_best_round_prefers_fewer_rollouts_on_ties():
  assert ei_lib.best_round([0.2, 0.3, 0.3, 0.1]) == 1
  assert ei_lib.best_round([0.5, 0.3]) == 0
  assert ei_lib.rollouts_after(3, 10, 16) == 480


def test_workdir_with_other_settings_is_refused(tmp_path):
  c = EI_CFG.get_config("smoke")
  ei_exp.check_settings(str(tmp_path), c)
  ei_exp.check_settings(str(tmp_path), c)  # same settings: fine
  c.ei.rounds, c.ei.stop_after_round = 7, 1  # how many rounds run may change
  ei_exp.check_settings(str(tmp_path), c)
  c.ei.k, c.train.opt.lr = 3, 0.5
  with pytest.raises(ValueError, match=r"ei\.k, train\.opt\.lr"):
    ei_exp.check_settings(str(tmp_path), c)
  c.ei.k, c.train.opt.lr = 4, EI_CFG.get_config("smoke").train.opt.lr  # a JSON round trip
  ei_exp.check_settings(str(tmp_path), c)  # of the same settings is the same
  # A workdir sampled by another sampler version (what a key draws changed) is refused.
  path = tmp_path / ei_exp.SETTINGS_FILE
  old = json.loads(path.read_text())
  old["sampler_version"] = sampling.SAMPLER_VERSION - 1
  path.write_text(json.dumps(old))
  with pytest.raises(ValueError, match="sampler_version"):
    ei_exp.check_settings(str(tmp_path), c)


def test_configs_args_and_gemma_presets_validate():
  for module in (EI_CFG, SFT_CFG):
    with pytest.raises(ValueError, match="smoke"):
      module.get_config("nope")
  g = EI_CFG.get_config("gemma")
  assert (g.ei.k, g.ei.temperature, g.train.epochs, g.train.batch_size, g.train.opt.lr) == (
      96, 1.0, 4.0, 128, 2e-5)
  assert g.train.opt.lr * g.train.opt.final_lr_ratio == pytest.approx(2e-7)
  with pytest.raises(ValueError, match="config.base"):
    ei_exp.check_config(g)
  g.base = "/ckpt/gemma-2-9b"
  with pytest.raises(ValueError, match="task.train_path"):
    ei_exp.check_config(g)
  s = SFT_CFG.get_config("gemma")
  assert (s.train.epochs, s.train.batch_size, s.eval.k, s.task.name) == (4.0, 128, 96, "gsm8k")
  with pytest.raises(ValueError, match="config.init_from"):
    sft_exp.check_config(s)
  s.init_from = "/ckpt/gemma-2-9b"
  with pytest.raises(ValueError, match="task.train_path"):
    sft_exp.check_config(s)
  assert EI_CFG.get_config("k4").ei.k == 4 and EI_CFG.get_config("").ei.k == 16


# ---------------------------------------------------------------------------------------------
# The experiments, end to end (subprocesses on one CPU device, as a user's run).


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e["JAX_PLATFORMS"] = "cpu"
  # The runs share compiled programs (same shapes), which keeps this file fast.
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return e


def _main(env, config, workdir, *flags):
  done = subprocess.run([sys.executable, "-m", "qdc_jax.main", f"--config={config}",
                         f"--workdir={workdir}", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  return done


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _value(completion):
  """The number a completion answers (None without an answer line)."""
  return answers.normalize_number(answers.extract_answer(completion) or "")


def _check_report_schema(report, algorithm, splits=("in_dist", "ood")):
  assert report["algorithm"] == algorithm
  assert isinstance(report["variant"], str) and isinstance(report["seed"], int)
  k = report["k"]
  keys = {"maj@1", f"maj@{k}", f"pass@{k}", "sample_accuracy", "diversity/exact_all",
          "diversity/trace_all", "diversity/exact_correct", "diversity/trace_correct"}
  for point in report["curve"]:
    assert keys | {"round", "rollouts"} <= set(point)
    for key in ("maj@1", f"maj@{k}", f"pass@{k}", "sample_accuracy"):
      assert 0.0 <= point[key] <= 1.0
    assert point[f"pass@{k}"] >= point["sample_accuracy"] - 1e-9  # pass@k >= pass@1
  assert sorted(report["final"]) == sorted(splits)
  for m in report["final"].values():
    assert keys <= set(m)


@pytest.fixture(scope="module")
def ei_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ei") / "ref"
  _main(env, "configs/ei.py:smoke", workdir)
  return workdir


def test_ei_smoke_end_to_end(ei_run):
  c = EI_CFG.get_config("smoke")
  task = common.load_task(c.task)  # the questions, loaded independently of the run
  report = json.loads((ei_run / common.REPORT_FILE).read_text())
  _check_report_schema(report, "ei")
  rounds = [p["round"] for p in report["curve"]]
  assert rounds == list(range(c.ei.rounds + 1))  # patience 5: both rounds run
  # Rollouts: exactly rounds x questions x K, and that many completions were saved.
  for p in report["curve"]:
    assert p["rollouts"] == p["round"] * len(task.train) * c.ei.k
  truth = {it.prompt: arith.problem_from_text(it.question).answer for it in task.train}
  previous = []
  for i in rounds[1:]:
    rows = _jsonl(ei_run / f"round_{i}" / "samples.jsonl")
    assert [r["prompt"] for r in rows] == [it.prompt for it in task.train]
    assert all(len(r["samples"]) == c.ei.k for r in rows)
    data = _jsonl(ei_run / f"round_{i}" / "dataset.jsonl")
    # Every training record is correct per the lab oracle (the true value of the question)...
    for r in data:
      assert _value(r["completion"]) == truth[r["prompt"]]
    # ... unique up to whitespace ...
    keys = [(r["prompt"], " ".join(r["completion"].split())) for r in data]
    assert len(set(keys)) == len(keys)
    # ... and D_i is exactly D_{i-1} plus this round's new correct solutions.
    correct = {(r["prompt"], " ".join(s.split())) for r in rows for s in r["samples"]
               if _value(s) == truth[r["prompt"]]}
    prev_keys = [(r["prompt"], " ".join(r["completion"].split())) for r in previous]
    assert keys[:len(prev_keys)] == prev_keys
    assert set(keys) == set(prev_keys) | correct
    assert report["notes"]["dataset_size"][i] == len(data)
    previous = data
  assert previous, "the smoke run found no correct sample; nothing was trained"
  # The exported model is the round with the best validation maj@1.
  history = [p["maj@1"] for p in report["curve"]]
  best = report["notes"]["best_round"]
  assert history[best] == max(history) and best == history.index(max(history))
  meta = json.loads((ei_run / "model" / "model.json").read_text())
  assert meta["notes"]["round"] == best
  assert (ei_run / "round_2" / "checkpoints").exists()
  # Each round logged once, with its rollouts.
  log = _jsonl(ei_run / "ei_metrics.jsonl")
  assert [r["step"] for r in log] == rounds
  assert [r["rollouts"] for r in log] == [p["rollouts"] for p in report["curve"]]
  assert (ei_run / ei_exp.CURVE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ei_resume_after_round_1_equals_uninterrupted(ei_run, env, tmp_path):
  work = tmp_path / "resumed"
  shutil.copytree(ei_run, work)
  # The state of a run killed in round 2's fit: samples saved, fit at its step-2 checkpoint.
  r2 = work / "round_2"
  for name in ("done.json", "dataset.jsonl"):
    (r2 / name).unlink()
  steps = sorted(int(s) for s in os.listdir(r2 / "checkpoints") if s.isdigit())
  assert steps == [2, 4]
  shutil.rmtree(r2 / "checkpoints" / "4")
  for name in (common.REPORT_FILE, ei_exp.CURVE_PNG):
    (work / name).unlink()
  shutil.rmtree(work / "model")
  stat = lambda p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns)
  untouched = [work / "round_1" / "samples.jsonl", work / "round_1" / "dataset.jsonl",
               work / "round_1" / "done.json", r2 / "samples.jsonl"]
  before = [stat(p) for p in untouched]
  _main(env, "configs/ei.py:smoke", work)
  assert [stat(p) for p in untouched] == before  # round 1 and round 2's samples reused
  for i in (1, 2):
    assert (_jsonl(work / f"round_{i}" / "dataset.jsonl")
            == _jsonl(ei_run / f"round_{i}" / "dataset.jsonl"))
  assert (json.loads((work / common.REPORT_FILE).read_text())
          == json.loads((ei_run / common.REPORT_FILE).read_text()))
  # The fit resumed where it was cut: the same loss at the last step, the same metrics after.
  last = lambda d: [r for r in _jsonl(d / "round_2" / "train_metrics.jsonl") if "loss" in r][-1]
  assert last(work)["step"] == 4 and last(work)["loss"] == last(ei_run)["loss"]
  val = lambda d: {k: v for k, v in json.loads((d / "round_2" / "done.json").read_text())[
      "val_full"].items() if not k.endswith(("_seconds", "_per_s"))}  # all but timings
  assert len(val(work)) > 8 and val(work) == val(ei_run)
  assert [r["step"] for r in _jsonl(work / "ei_metrics.jsonl")] == [0, 1, 2]
  # The same settings with another K are refused, naming the key.
  bad = subprocess.run([sys.executable, "-m", "qdc_jax.main", "--config=configs/ei.py:smoke",
                        f"--workdir={work}", "--config.ei.k=3"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "ei.k" in bad.stderr


def test_sft_smoke_end_to_end(env, tmp_path):
  work = tmp_path / "sft"
  c = SFT_CFG.get_config("smoke")
  _main(env, "configs/sft.py:smoke", work)
  report = json.loads((work / common.REPORT_FILE).read_text())
  _check_report_schema(report, "sft")
  assert [(p["round"], p["rollouts"]) for p in report["curve"]] == [(0, 0), (1, 0)]
  log = _jsonl(work / "sft_metrics.jsonl")
  assert log[-1]["step"] == c.train.steps
  # The exported model is the fine-tuned one, not a copy of the shipped student.
  _, tuned, _, _, _ = model_io.load_model(str(work / "model"))
  _, base, _, _, _ = model_io.load_model(model_io.asset_path("lab_student"))
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(base))]
  assert max(diffs) > 0


def test_prune_keeps_the_two_latest_and_the_best_rounds(tmp_path):
  done = {j: {"val": {"maj@1": v}} for j, v in enumerate([0.1, 0.2, 0.5, 0.3, 0.4, 0.45])}
  for j in range(1, 6):
    (tmp_path / f"round_{j}" / "checkpoints" / "7").mkdir(parents=True)
  ei_exp._prune(str(tmp_path), done)
  kept = sorted(j for j in range(1, 6) if (tmp_path / f"round_{j}" / "checkpoints").exists())
  assert kept == [2, 4, 5]  # best (2) and the two latest (4, 5)
  assert all((tmp_path / f"round_{j}").exists() for j in range(1, 6))  # data stays
