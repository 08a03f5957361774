"""The scaling workload's pieces: fit's pluggable objective and early stopping, array
pipelines, the byte tokenizer, corpora, the regression head, and the workload end to end
(smoke, resume, settings guard)."""

import functools
import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qdc_jax import config_lib, fit, tokenizers, train
from qdc_jax import sharding as sharding_lib
from qdc_jax.data import pipeline
from qdc_jax.experiments import scaling
from qdc_jax.models import heads, transformer
from qdc_jax.scaling import corpora, manifold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import scaling as scaling_config  # pylint: disable=g-import-not-at-top,wrong-import-position

MESH = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
RULES = sharding_lib.DEFAULT_RULES


# ------------------------------------------------------------------ tokenizer, pipelines

def test_byte_tokenizer_round_trips_any_text_and_rejects_bad_ids():
  tok = tokenizers.make_tokenizer("byte")
  assert isinstance(tok, tokenizers.Tokenizer)
  text = "def f(x):\n  return x ** 2  # héllo ✓ 日本"
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert ids[1:-1] == [b + 3 for b in text.encode("utf-8")]
  assert tok.decode(ids + [50, 60]) == text  # stops at eos
  assert tok.vocab_size == 264 and max(ids) < tok.vocab_size
  assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut character: replaced, no crash
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([tok.vocab_size + 1])


def test_lm_windows_match_a_naive_cut():
  toks = np.arange(100, 153)
  w = pipeline.lm_windows(toks, 8)
  n = (len(toks) - 1) // 8
  for i in range(n):
    np.testing.assert_array_equal(w["inputs"][i], toks[i * 8:i * 8 + 8])
    np.testing.assert_array_equal(w["targets"][i], toks[i * 8 + 1:i * 8 + 9])
  assert w["loss_mask"].sum() == n * 8 and w["positions"][1].tolist() == list(range(8))
  with pytest.raises(ValueError, match="no row"):
    pipeline.lm_windows(np.arange(5), 8)


def test_array_dataset_resumes_exactly_and_eval_batches_cover_every_row_once():
  cols = {"x": np.arange(37, dtype=np.float32)[:, None] * np.ones((1, 3)),
          "y": np.arange(37)}
  it = pipeline.array_dataset(cols, batch_size=8, seed=1)
  seen = [next(it)["y"] for _ in range(3)]
  state = pipeline.iterator_state_to_json(it)
  rest = [next(it)["y"] for _ in range(6)]
  it2 = pipeline.restore_iterator_state(pipeline.array_dataset(cols, batch_size=8, seed=1),
                                        state)
  for a in rest:
    np.testing.assert_array_equal(next(it2)["y"], a)
  first_epoch = np.concatenate(seen + rest)[:37]
  assert sorted(first_epoch.tolist()) == list(range(37))  # an epoch is a permutation
  batches = pipeline.array_eval_batches({**cols, "w": np.ones(37)}, batch_size=8)
  assert len(batches) == 5 and all(b["x"].shape == (8, 3) for b in batches)
  assert sum(b["w"].sum() for b in batches) == 37  # filler rows weigh nothing
  with pytest.raises(ValueError, match="one non-zero length"):
    pipeline.array_dataset({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=2)


# ------------------------------------------------------------------ objective, fit

def _regression_setup(n=96, dim=2, chunks=4, ambient=16):
  cfg = config_lib.model_config(config_lib.model_section("lab_tiny", max_len=64))
  data = manifold.make(n, dim, ambient, problem_seed=0, sample_seed=1)
  cols = manifold.columns(data, chunks, float(data.y.mean()), float(data.y.std()))
  return heads.Regressor(cfg), manifold.objective(chunks, ambient // chunks), cols


def test_regression_loss_matches_numpy_and_ignores_zero_weight_rows():
  model, obj, cols = _regression_setup(n=12)
  params = jax.jit(lambda r: model.init(r, *obj.init_args(0))["params"])(
      jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p + 0.01, params)  # a non-zero head
  batch = {k: jnp.asarray(v) for k, v in cols.items()}
  batch["weight"] = batch["weight"].at[3:5].set(0.0)
  loss, aux = manifold.regression_loss_sums(params, batch, model=model)
  pred = np.asarray(model.apply({"params": params}, batch["x"]))
  w = np.asarray(batch["weight"])
  np.testing.assert_allclose(float(loss), np.sum(w * (pred - cols["y"]) ** 2), rtol=1e-5)
  assert float(aux["tokens"]) == 10


def test_regressor_reads_every_chunk():
  model, obj, cols = _regression_setup(n=4)
  params = model.init(jax.random.PRNGKey(0), *obj.init_args(0))["params"]
  params = jax.tree.map(lambda p: p + 0.05, params)
  x = jnp.asarray(cols["x"])
  base = model.apply({"params": params}, x)
  for c in range(x.shape[1]):  # perturbing any chunk moves the output (the head sees all)
    moved = model.apply({"params": params}, x.at[:, c].add(1.0))
    assert float(jnp.max(jnp.abs(moved - base))) > 1e-4, c


def test_train_step_with_a_custom_objective_accumulates_like_one_batch():
  model, obj, cols = _regression_setup(n=16)
  tx = optax.sgd(0.1)
  state, _ = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx, seq_len=0,
                                      mesh=MESH, rules=RULES, objective=obj)
  batch = {k: jnp.asarray(v) for k, v in cols.items()}
  outs = []
  for accum in (1, 4):
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, accum_steps=accum,
                                     loss_fn=obj.loss_sums))
    outs.append(step(jax.tree.map(jnp.copy, state), batch, jax.random.PRNGKey(0)))
  np.testing.assert_allclose(outs[0][1]["loss"], outs[1][1]["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               outs[0][0]["params"], outs[1][0]["params"])


def _tc(**kw):
  tc = fit.default_train_config()
  tc.update(dict(steps=40, batch_size=8, seq_len=4, log_every=5, save_every=5, eval_every=5,
                 keep=3, async_checkpoint=False))
  tc.opt.warmup_steps = 2
  tc.update(kw)
  return tc


def test_early_stopping_update_matches_a_naive_rule():
  tc = _tc(patience=2, min_delta=0.01)
  for losses in ([1.0, 0.9, 0.895, 0.95, 0.7], [1.0, 0.5, 0.6, 0.3, 0.35, 0.29, 0.2, 0.21, 0.3],
                 list(np.random.default_rng(0).uniform(0, 1, 30))):
    rule = fit.EarlyStopping()
    best, best_i, bad, stop_at = float("inf"), -1, 0, None
    for i, l in enumerate(losses):
      if l < best - 0.01:
        best, best_i, bad = l, i, 0
      else:
        bad += 1
      if bad >= 2:
        stop_at = i
        break
    for i, l in enumerate(losses):
      rule.update(i, l, tc)
      if rule.stopped:
        assert i == stop_at
        break
    assert rule.stopped == (stop_at is not None)
    assert (rule.best_loss, rule.best_step) == (best, best_i)


def test_fit_stops_on_held_out_loss_keeps_the_best_checkpoint_and_resumes_as_stopped(
    tmp_path):
  model, obj, cols = _regression_setup()
  valid = pipeline.array_eval_batches(cols, batch_size=8)
  # lr = 0: the held-out loss never improves after the first evaluation, so the run stops
  # at exactly eval_every * (patience + 1).
  tc = _tc(patience=2)
  tc.opt.lr = 0.0
  kw = dict(model=model, workdir=str(tmp_path / "r"), mesh=MESH, rules=RULES,
            eval_data=valid, objective=obj)
  res = fit.fit(tc, data=pipeline.array_dataset(cols, batch_size=8), **kw)
  assert res.stopped_early and res.finished(tc) and res.step == 15
  assert res.eval_metrics["best_step"] == 5 and res.eval_metrics["stopped_early"]
  again = fit.fit(tc, data=pipeline.array_dataset(cols, batch_size=8), **kw)
  assert again.step == 15 and again.stopped_early  # nothing more was trained
  assert again.eval_metrics["eval_loss"] == pytest.approx(res.eval_metrics["eval_loss"])
  params, _ = fit.load_params(str(tmp_path / "r"), model=model, tc=tc, mesh=MESH,
                              rules=RULES, step=5, objective=obj)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(res.params))
  with pytest.raises(ValueError, match="needs train.eval_every"):
    fit.fit(_tc(patience=2, eval_every=0), data=pipeline.array_dataset(cols, batch_size=8),
            **{**kw, "workdir": str(tmp_path / "x")})


def test_fit_on_an_array_iterator_resumes_bit_identically(tmp_path):
  model, obj, cols = _regression_setup()
  valid = pipeline.array_eval_batches(cols, batch_size=8)
  kw = dict(model=model, mesh=MESH, rules=RULES, eval_data=valid, objective=obj)
  full = fit.fit(_tc(steps=20), data=pipeline.array_dataset(cols, batch_size=8),
                 workdir=str(tmp_path / "full"), **kw)
  cut = fit.fit(_tc(steps=20, stop_at_step=10), data=pipeline.array_dataset(cols, batch_size=8),
                workdir=str(tmp_path / "cut"), **kw)
  assert cut.step == 10 and not cut.finished(_tc(steps=20))
  resumed = fit.fit(_tc(steps=20), data=pipeline.array_dataset(cols, batch_size=8),
                    workdir=str(tmp_path / "cut"), **kw)
  assert resumed.step == 20
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.params),
               jax.device_get(resumed.params))
  assert full.eval_metrics["eval_loss"] < 1.5  # it learns (1 = the constant predictor)


# ------------------------------------------------------------------ corpora

def test_corpora_split_is_disjoint_and_stable_and_streams_are_nested(tmp_path):
  docs = {f"d{i}.txt": f"document {i} " * (i % 7 + 1) for i in range(60)}
  for name, text in docs.items():
    (tmp_path / name).write_text(text)
  c = corpora.load("t", corpora.section("files", path=str(tmp_path / "*.txt"),
                                        valid_fraction=0.2, test_fraction=0.2))
  parts = [set(c.train), set(c.valid), set(c.test)]
  assert sum(map(len, parts)) == 60 and not (parts[0] & parts[1] or parts[0] & parts[2]
                                             or parts[1] & parts[2])
  (tmp_path / "d999.txt").write_text("a new document")  # adding one moves no other
  c2 = corpora.load("t", corpora.section("files", path=str(tmp_path / "*.txt"),
                                         valid_fraction=0.2, test_fraction=0.2))
  assert set(c.test) <= set(c2.test) and set(c.train) <= set(c2.train)
  tok = tokenizers.ByteTokenizer()
  big = corpora.token_stream(c.train, tok, max_tokens=300, seed=0)
  small = corpora.token_stream(c.train, tok, max_tokens=120, seed=0)
  np.testing.assert_array_equal(small, big[:120])  # nested data sets
  assert big[0] == tok.bos_id
  with pytest.raises(ValueError, match="fewer than"):
    corpora.token_stream(c.train, tok, max_tokens=10**7, seed=0)


def test_jsonl_corpus_names_a_row_without_the_field(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
  with pytest.raises(ValueError, match=r"row 2 has no field 'text'"):
    corpora.load("j", corpora.section("files", path=str(p)))
  with pytest.raises(ValueError, match="matches no file"):
    corpora.load("j", corpora.section("files", path=str(tmp_path / "none*.txt")))
  with pytest.raises(ValueError, match="unknown kind"):
    corpora.load("j", corpora.section("nope"))


def test_shipped_corpora_load_with_provenance():
  sh = corpora.load("s", corpora.section("shakespeare"))
  assert sh.provenance["sha256"] == corpora.SHAKESPEARE_SHA256
  assert sum(sh.provenance["bytes"].values()) == 1115394
  assert "ROMEO" in "".join(sh.train + sh.valid + sh.test)
  py = corpora.load("p", corpora.section("python_stdlib", max_docs=50))
  assert py.provenance["python"] == sys.version and len(py.provenance["sha256"]) == 64
  assert any("def " in d for d in py.train)


def test_a_damaged_shipped_corpus_is_refused(tmp_path, monkeypatch):
  from qdc_jax import model_io
  (tmp_path / "corpora").mkdir()
  with gzip.open(tmp_path / "corpora" / "tinyshakespeare.txt.gz", "wb") as f:
    f.write(b"not shakespeare")
  monkeypatch.setattr(model_io, "asset_path", lambda name: str(tmp_path / name))
  with pytest.raises(ValueError, match="damaged"):
    corpora.load("s", corpora.section("shakespeare"))


def test_tfds_corpus_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ValueError, match="not prepared"):
    corpora.load("t", corpora.section("tfds", path="tiny_shakespeare", data_dir=str(tmp_path)))


# ------------------------------------------------------------------ the workload

def _smoke_config():
  return scaling_config.get_config("smoke")


def test_scaling_smoke_writes_reports_and_resumes_without_rerunning(tmp_path, monkeypatch):
  c = _smoke_config()
  c.train.stop_at_step = 10  # as if killed: units stop mid-training
  out = scaling.run(c, str(tmp_path))
  assert out["incomplete"] and not (tmp_path / "report.md").exists()
  c.train.stop_at_step = -1
  out = scaling.run(c, str(tmp_path))
  assert not out["incomplete"]
  for f in ("report.md", "report.json", "loss_vs_data.png", "id_ablations.png",
            "loss_vs_params.png", "manifold.png"):
    assert (tmp_path / f).exists(), f
  fits = out["fits"]
  assert np.isfinite(fits["data"]["lab"]["alpha"]) and fits["data"]["lab"]["id"] > 0
  assert fits["data"]["lab"]["predicted"] == pytest.approx(2 / (2 + fits["data"]["lab"]["id"]))
  assert np.isfinite(fits["width"]["alpha"]) and np.isfinite(fits["manifold"]["2"]["alpha"])
  runs = out["corpora"]["lab"]["runs"]
  assert [r["tokens"] for r in runs] == list(c.data.sizes)
  assert all(r["best_step"] <= r["steps_run"] for r in runs)
  report = (tmp_path / "report.md").read_text()
  assert "alpha_D_hat" in report and "Table 2.1" in report
  # Every unit finished: a rerun reads them back and trains nothing.
  monkeypatch.setattr(fit, "fit", lambda *a, **k: pytest.fail("a finished unit ran again"))
  again = scaling.run(c, str(tmp_path))
  assert again["fits"]["data"] == out["fits"]["data"]
  # Other settings on the same workdir: refused, naming what changed.
  c.train.opt.lr = 0.5
  with pytest.raises(ValueError, match="train.opt.lr"):
    scaling.run(c, str(tmp_path))


def test_committed_results_load_refit_and_table(tmp_path):
  from qdc_jax.scaling import laws, report
  results = report.load(os.path.join(REPO, "docs", "results", "scaling_full"))
  fit_again = report.fits(results)  # the committed fits follow from the committed runs
  for name, f in results["fits"]["data"].items():
    assert fit_again["data"][name]["alpha"] == pytest.approx(f["alpha"], rel=1e-9)
  assert fit_again["width"]["alpha"] == pytest.approx(results["fits"]["width"]["alpha"])
  table = report.exponents_markdown(results, fit_again)
  for name in results["corpora"]:
    assert f"| {name} | {fit_again['data'][name]['alpha']:.3f} +- " in table
  assert "## Model-size exponent (figure 2.3)" in table
  manifold_table = report.manifold_markdown(fit_again)
  assert manifold_table.count("\n| ") == len(fit_again["manifold"]) + 1
  assert report.manifold_markdown({**fit_again, "manifold": {}}) == ""
  assert report.table_2_1_markdown(laws.table_2_1()).count("| GPT-2 |") == 2
  made = report.plots(str(tmp_path), results, fit_again)
  assert made == ["loss_vs_data.png", "id_ablations.png", "loss_vs_params.png", "manifold.png"]
  with pytest.raises(FileNotFoundError, match="not a finished scaling workdir"):
    report.load(str(tmp_path))


def test_scaling_config_presets_build_and_validate():
  for arg in ("", "lab_full", "gpt2", "smoke"):
    c = scaling_config.get_config(arg)
    assert len(c.data.sizes) >= 3 and c.train.keep >= c.train.patience + 1
  lab = scaling_config.get_config("")
  assert max(lab.data.sizes) / min(lab.data.sizes) >= 1000  # three orders of magnitude
  gpt2 = scaling_config.get_config("gpt2")
  assert (gpt2.train.opt.lr, gpt2.train.opt.warmup_steps, gpt2.train.steps) == (6e-4, 2000,
                                                                                 200_000)
  with pytest.raises(ValueError, match="Unknown configs/scaling.py arg"):
    scaling_config.get_config("nope")
