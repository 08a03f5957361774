"""Return-conditioned RL: steps, labels, balancing, label tokens, conditioned sampling, e2e."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qdc_jax import sampling
from qdc_jax import sharding as sharding_lib
from qdc_jax import tokenizers
from qdc_jax.data import answers, arith
from qdc_jax.rl import common, rcrl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import rcrl as rcrl_config  # pylint: disable=g-import-not-at-top,wrong-import-position

GOOD, BAD = rcrl.GOOD, rcrl.BAD


def test_split_steps_and_prefixes():
  sol = "94*5=470\n470-3=467  \n\nThe answer is 467."
  steps = rcrl.split_steps(sol)
  assert steps == ["94*5=470", "470-3=467", "The answer is 467."]
  assert rcrl.split_steps("") == []
  assert rcrl.prefix_text(steps, 0) == ""
  assert rcrl.prefix_text(steps, 2) == "94*5=470\n470-3=467\n"
  # The last prefix is the whole solution, which the policy already ended: no rollouts.
  assert rcrl.rollout_prefixes(steps) == ["94*5=470\n", "94*5=470\n470-3=467\n"]


def test_label_at_threshold():
  assert rcrl.label_of([True, False]) == GOOD  # mean 0.5 >= T = 0.5
  assert rcrl.label_of([True, False, False]) == BAD  # 1/3 < 0.5
  assert rcrl.label_of([True, True, True, False], threshold=0.75) == GOOD
  assert rcrl.label_of([True, True, False, False], threshold=0.75) == BAD
  assert rcrl.label_of([False] * 4) == BAD
  assert rcrl.label_of([True]) == GOOD
  with pytest.raises(ValueError):
    rcrl.label_of([])


def test_label_solution_scores_prefix_plus_continuation():
  sol = "2+1=3\n3*2=6\nThe answer is 6."
  d = rcrl.label_solution(
      question=0, sample=1, prompt="Q", answer="6", solution=sol,
      rollouts=[["3*2=6\nThe answer is 6.", "3*2=7\nThe answer is 7."],  # 1/2 -> GOOD
                ["The answer is 5.", "The answer is 9."]],  # 0/2 -> BAD
      is_correct=answers.is_correct)
  assert d.steps == ["2+1=3", "3*2=6", "The answer is 6."]
  assert d.step_correct == [[True, False], [False, False], [True]]
  assert d.labels == [GOOD, BAD, GOOD]  # the last step's return: the solution is correct
  assert d.correct
  # The continuation alone has no answer; only prefix + continuation does.
  seen = []
  rcrl.label_solution(question=0, sample=0, prompt="Q", answer="6", solution=sol,
                      rollouts=[["a"], ["b"]],
                      is_correct=lambda text, ref: seen.append(text) or False)
  assert seen == [sol, "2+1=3\na", "2+1=3\n3*2=6\nb"]
  with pytest.raises(ValueError, match="rollout groups"):
    rcrl.label_solution(question=0, sample=0, prompt="Q", answer="6", solution=sol,
                        rollouts=[["a"]], is_correct=answers.is_correct)
  assert rcrl.Labelled.from_json(json.loads(json.dumps(d.to_json()))) == d


def _random_data(n, seed, p_good=0.3):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(1, 6))
    labels = [GOOD if rng.random() < p_good else BAD for _ in range(length)]
    steps = [f"{i}+{j}={i + j}" for j in range(length - 1)] + [f"The answer is {i}."]
    out.append(rcrl.Labelled(question=i, sample=0, prompt=f"Question: q{i}\nSolution:\n",
                             answer=str(i), solution="\n".join(steps),
                             correct=labels[-1] == GOOD, steps=steps,
                             step_correct=[[l == GOOD] for l in labels], labels=labels))
  out.append(rcrl.Labelled(question=n, sample=0, prompt="Q", answer="1", solution="",
                           correct=False, steps=[], step_correct=[], labels=[]))
  return out


def _trained_counts(records):
  return (sum(r["completion"].count(GOOD) for r in records),
          sum(r["completion"].count(BAD) for r in records))


@pytest.mark.parametrize("seed,p_good", [(0, 0.3), (1, 0.15), (2, 0.6)])
def test_balance_modes_give_equal_counts(seed, p_good):
  data = _random_data(60, seed, p_good)
  n_correct = sum(d.correct for d in data)

  chosen, stats = rcrl.balance(data, "solutions", seed)
  kept = [data[i] for i, _ in chosen]
  assert all(cut == 0 for _, cut in chosen)
  assert sum(d.correct for d in kept) == sum(not d.correct for d in kept)
  assert len(kept) == 2 * min(n_correct, sum(1 for d in data if d.steps and not d.correct))
  assert stats["trained_correct_solutions"] * 2 == stats["trained_solutions"] == len(kept)

  chosen, stats = rcrl.balance(data, "steps", seed)
  records = [rcrl.make_record(data[i], cut) for i, cut in chosen]
  good, bad = _trained_counts(records)
  assert good == bad == stats["trained_good_steps"] == stats["trained_bad_steps"] > 0
  assert stats["trained_good_ratio"] == 0.5
  for (i, cut), r in zip(chosen, records):
    # Untrained steps stay in the prompt, labels and all: the text is unchanged.
    assert r["prompt"] + r["completion"] == data[i].prompt + rcrl.format_labelled(
        data[i].steps, data[i].labels)
    assert 0 <= cut < len(data[i].steps)

  chosen, stats = rcrl.balance(data, "none", seed)
  assert [i for i, _ in chosen] == list(range(60))  # everything but the empty solution
  assert stats["good_steps"] == sum(d.labels.count(GOOD) for d in data)
  assert stats["good_ratio"] == pytest.approx(
      stats["good_steps"] / (stats["good_steps"] + stats["bad_steps"]))


def test_balance_edge_cases():
  data = _random_data(10, 0)
  for d in data:
    d.correct = False
  with pytest.raises(ValueError, match="correct and incorrect"):
    rcrl.balance(data, "solutions")
  with pytest.raises(ValueError, match="Unknown balance"):
    rcrl.balance(data, "labels")

  def sol(*labels):
    steps = [f"s{j}" for j in range(len(labels))]
    return rcrl.Labelled(question=0, sample=0, prompt="Q", answer="1",
                         solution="\n".join(steps), correct=labels[-1] == GOOD, steps=steps,
                         step_correct=[[l == GOOD] for l in labels], labels=list(labels))

  # GOOD surplus 1, and one solution starts with GOOD: its first step moves to the prompt.
  chosen, stats = rcrl.balance([sol(BAD, GOOD, GOOD), sol(GOOD, BAD)], "steps")
  assert chosen == [(0, 0), (1, 1)]
  assert stats["trained_good_steps"] == stats["trained_bad_steps"] == 2
  # Every solution starts with BAD (the minority): drop the one whose GOOD surplus (2) is the
  # largest that does not overshoot the imbalance (2).
  chosen, stats = rcrl.balance([sol(BAD, GOOD, GOOD, GOOD), sol(BAD, GOOD, GOOD), sol(BAD)],
                               "steps")
  assert chosen == [(1, 0), (2, 0)]
  assert stats["trained_good_steps"] == stats["trained_bad_steps"] == 2
  # Overshooting (surplus 2 > imbalance 1) flips the surplus; cuts then finish the job.
  chosen, stats = rcrl.balance([sol(BAD, GOOD, GOOD, GOOD), sol(BAD, BAD, GOOD)], "steps")
  assert chosen == [(1, 1)]
  assert stats["trained_good_steps"] == stats["trained_bad_steps"] == 1


def test_record_format_and_strip_round_trip():
  d = rcrl.Labelled(question=0, sample=0, prompt="Question: Compute 94*5-3.\nSolution:\n",
                    answer="467", solution="94*5=470\n470-3=467\nThe answer is 467.",
                    correct=True, steps=["94*5=470", "470-3=467", "The answer is 467."],
                    step_correct=[[False], [True], [True]], labels=[BAD, GOOD, GOOD])
  r = rcrl.make_record(d)
  assert r == {"prompt": d.prompt,
               "completion": "[BAD]94*5=470\n[GOOD]470-3=467\n[GOOD]The answer is 467."}
  assert rcrl.strip_labels(r["completion"]) == d.solution
  r1 = rcrl.make_record(d, cut=1)
  assert r1["prompt"] == d.prompt + "[BAD]94*5=470\n"
  assert r1["completion"] == "[GOOD]470-3=467\n[GOOD]The answer is 467."
  assert rcrl.strip_labels(r1["prompt"] + r1["completion"]) == d.prompt + d.solution
  # Scoring after stripping reads the right answer.
  assert answers.is_correct(rcrl.strip_labels(r["completion"]), "467")


def test_tokenizer_extension_is_append_only():
  meta = {"kind": "char", "alphabet": arith.ALPHABET}
  old = tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
  new_meta, tok = rcrl.extend_tokenizer(meta, rcrl.LABELS, model_vocab_size=128)
  assert new_meta["alphabet"] == arith.ALPHABET + "[]"
  assert meta["alphabet"] == arith.ALPHABET  # the caller's metadata is not modified
  for ch in arith.ALPHABET:
    assert tok.encode(ch) == old.encode(ch)
  text = "[GOOD]94*5=470\n[BAD]The answer is 470."
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert tokenizers.CHAR_UNK_ID not in ids
  assert tok.decode(ids) == text
  assert old.encode("[")[0] == tokenizers.CHAR_UNK_ID and tok.encode("[]") == [80, 81]
  # Rebuilt from the exported metadata, the tokenizer is the same.
  again = tokenizers.make_tokenizer("char", alphabet=new_meta["alphabet"])
  assert again.encode(text) == tok.encode(text)
  # An alphabet already holding the label characters is unchanged.
  assert rcrl.extend_tokenizer(new_meta, rcrl.LABELS, 128)[0] == new_meta
  with pytest.raises(ValueError, match="vocab_size is 81"):
    rcrl.extend_tokenizer(meta, rcrl.LABELS, model_vocab_size=81)


def test_label_embeddings_start_at_the_mean_row():
  meta = {"kind": "char", "alphabet": arith.ALPHABET}
  new_meta, _ = rcrl.extend_tokenizer(meta, rcrl.LABELS, 128)
  rng = np.random.default_rng(0)
  params = {"embedding": jax.numpy.asarray(rng.normal(size=(128, 16)), jax.numpy.float32),
            "lm_head": jax.numpy.asarray(rng.normal(size=(16, 128)), jax.numpy.float32),
            "layer_0": {"w": jax.numpy.ones((3,))}}
  out = rcrl.init_label_embeddings(params, meta, new_meta)
  emb, old = np.asarray(out["embedding"]), np.asarray(params["embedding"])
  np.testing.assert_array_equal(emb[:80], old[:80])  # every id the base knows
  np.testing.assert_array_equal(emb[82:], old[82:])  # rounding slack untouched
  for i in (80, 81):
    np.testing.assert_allclose(emb[i], old[4:80].mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["lm_head"])[:, i],
                               np.asarray(params["lm_head"])[:, 4:80].mean(1), atol=1e-6)
  assert out["layer_0"] is params["layer_0"]
  assert rcrl.init_label_embeddings(params, new_meta, new_meta) is params


def test_settings_fingerprint(tmp_path):
  from qdc_jax.experiments import rcrl as rcrl_exp  # pylint: disable=g-import-not-at-top
  c = rcrl_config.get_config("smoke")
  rcrl_exp.check_settings(c, str(tmp_path))  # a fresh workdir is not pinned by a check
  assert not (tmp_path / rcrl_exp.SETTINGS_FILE).exists()
  rcrl_exp.check_settings(c, str(tmp_path), record=True)
  c.train.stop_at_step = 3  # may change on resume
  rcrl_exp.check_settings(c, str(tmp_path))
  c.rcrl.balance, c.task.train_size = "steps", 99
  with pytest.raises(ValueError, match=r"rcrl\.balance: 'solutions' -> 'steps'.*"
                                       r"task\.train_size: 16 -> 99"):
    rcrl_exp.check_settings(c, str(tmp_path))


@pytest.fixture(scope="module")
def student():
  """The shipped student with the label tokenizer; label rows at the mean embedding (as RCRL
  training starts), so it writes several lines after [GOOD]."""
  mesh = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding_lib.DEFAULT_RULES
  policy = common.load_policy("asset:lab_student", mesh=mesh, rules=rules)
  meta, tok = rcrl.extend_tokenizer(policy.meta["tokenizer"], rcrl.LABELS, 128)
  params = rcrl.init_label_embeddings(policy.params, policy.meta["tokenizer"], meta)
  prompts = [arith.PROMPT_TEMPLATE.format(question=p.text)
             for p in arith.make_split("in_dist", 6, seed=5)]
  kw = dict(model=policy.model, tokenizer=tok, mesh=mesh, rules=rules,
            param_shardings=policy.shardings, batch_size=8, pad_multiple=64)
  return params, prompts, kw


STEP = dict(step_tokens=24, max_steps=6, max_new_tokens=96)


def test_conditioned_sampling_without_label_is_plain_greedy(student):
  params, prompts, kw = student
  rng = jax.random.PRNGKey(0)
  plain = sampling.generate_text(params, prompts, rng=rng, sp=sampling.SamplingParams(
      max_new_tokens=96, greedy=True), **kw)
  fused = rcrl.conditioned_generate(params, prompts, greedy=True, label="", rng=rng, **STEP,
                                    **kw)
  assert [s[0] for s in fused] == [p[0] for p in plain]
  # Rows stop on their own (EOS after different numbers of lines).
  assert len({len(rcrl.split_steps(p[0])) for p in plain}) > 1
  capped = rcrl.conditioned_generate(params, prompts, greedy=True, label="", rng=rng,
                                     **{**STEP, "max_steps": 2}, **kw)
  for (c,), (p,) in zip(capped, plain):
    lines = p.split("\n")
    assert c == "\n".join(lines[:2]) + ("\n" if len(lines) > 2 else "")


def test_conditioned_sampling_puts_the_label_before_every_step(student):
  params, prompts, kw = student
  rng = jax.random.PRNGKey(1)
  # The one-call sampler equals the thesis's loop of one sampler call per step.
  fused = rcrl.conditioned_generate(params, prompts, greedy=True, rng=rng, **STEP, **kw)
  stepwise = rcrl.conditioned_generate_stepwise(params, prompts, greedy=True, rng=rng, **STEP,
                                                **kw)
  assert fused == stepwise
  sampled = rcrl.conditioned_generate(params, prompts, num_samples=3, temperature=1.0,
                                      rng=rng, **STEP, **kw)
  assert [len(row) for row in sampled] == [3] * len(prompts)
  n_lines = []
  for text in [t for row in fused + sampled for t in row]:
    lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    assert all(l.startswith(GOOD) for l in lines), text
    assert len(lines) <= STEP["max_steps"]
    # Only a row that hit max_steps or the token budget ends right after a newline.
    if text.endswith("\n") and len(lines) < STEP["max_steps"]:
      assert len(rcrl.strip_labels(text)) >= STEP["max_new_tokens"]
    assert all(len(l) - len(GOOD) <= STEP["step_tokens"] for l in lines)
    n_lines.append(len(lines))
  assert max(n_lines) >= 3 and len(set(n_lines)) > 1  # several steps; rows stop apart


def _one_device_env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_smoke_end_to_end(tmp_path):
  workdir = tmp_path / "rcrl"
  cmd = [sys.executable, "-m", "qdc_jax.main", "--config=configs/rcrl.py:smoke",
         f"--workdir={workdir}"]
  # Stopped during training (as if killed): data written, no model, no report yet.
  first = subprocess.run(cmd + ["--config.train.stop_at_step=2"], cwd=REPO,
                         env=_one_device_env(), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  data_file = workdir / "rcrl_data.jsonl"
  data_mtime = data_file.stat().st_mtime_ns
  assert not (workdir / "model").exists() and not (workdir / common.REPORT_FILE).exists()
  done = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert data_file.stat().st_mtime_ns == data_mtime  # resumed: not sampled again
  logged = [json.loads(l)["step"]
            for l in (workdir / "rcrl_metrics.jsonl").read_text().splitlines()]
  assert logged == [2, 4]  # training resumed at step 2, every step logged once

  c = rcrl_config.get_config("smoke")
  report = json.loads((workdir / common.REPORT_FILE).read_text())
  assert report["algorithm"] == "rcrl" and report["k"] == c.eval.k
  assert [p["round"] for p in report["curve"]] == [0, 1]
  assert report["curve"][0]["rollouts"] == 0
  assert set(report["final"]) == {"in_dist", "ood"}
  for h in [*report["curve"], *report["final"].values()]:
    assert 0.0 <= h["maj@1"] <= 1.0 and 0.0 <= h[f"pass@{c.eval.k}"] <= 1.0
  assert "labels/with_bad_share" in report["notes"]["unconditioned_label_use"]["val"]

  rows = [json.loads(l) for l in data_file.read_text().splitlines()]
  assert len(rows) == c.task.train_size * c.rcrl.samples_per_question
  drawn = 0
  for r in rows:
    assert r["steps"] == rcrl.split_steps(r["solution"])
    assert len(r["rollouts"]) == max(len(r["steps"]) - 1, 0)
    assert all(len(g) == c.rcrl.rollouts_per_step for g in r["rollouts"])
    # Recompute every return from the stored texts, and every label from the returns.
    recomputed = [[answers.is_correct(rcrl.prefix_text(r["steps"], i + 1) + t, r["answer"])
                   for t in g] for i, g in enumerate(r["rollouts"])]
    if r["steps"]:
      recomputed.append([answers.is_correct(r["solution"], r["answer"])])
    assert r["step_correct"] == recomputed
    assert r["labels"] == [GOOD if np.mean(x) >= c.rcrl.threshold else BAD
                           for x in recomputed]
    drawn += 1 + c.rcrl.rollouts_per_step * max(len(r["steps"]) - 1, 0)
  assert report["curve"][1]["rollouts"] == drawn == report["notes"]["rollouts"]["total"]

  # Balanced as configured ('solutions'): as many correct as incorrect solutions trained.
  records = [json.loads(l) for l in (workdir / "rcrl_train.jsonl").read_text().splitlines()]
  correct = {(r["prompt"], "\n".join(r["steps"])): r["correct"] for r in rows}
  trained = [correct[(r["prompt"], rcrl.strip_labels(r["completion"]))] for r in records]
  assert sum(trained) * 2 == len(records) > 0
  labels = report["notes"]["labels"]
  assert labels["trained_good_steps"] == sum(r["completion"].count(GOOD) for r in records)

  meta = json.loads((workdir / "model" / "model.json").read_text())
  assert meta["tokenizer"]["alphabet"] == arith.ALPHABET + "[]"
  assert meta["notes"]["algorithm"] == "rcrl"

  # A finished workdir: nothing new. Other settings: refused, naming the key.
  from qdc_jax.experiments import rcrl as rcrl_exp  # pylint: disable=g-import-not-at-top
  before = (workdir / common.REPORT_FILE).stat().st_mtime_ns
  assert rcrl_exp.run(c, str(workdir)) == report
  assert (workdir / common.REPORT_FILE).stat().st_mtime_ns == before
  c.rcrl.threshold = 0.7
  with pytest.raises(ValueError, match=r"rcrl\.threshold: 0\.5 -> 0\.7"):
    rcrl_exp.run(c, str(workdir))
