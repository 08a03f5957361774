"""Scaling laws from the intrinsic dimension of data (thesis chapter 2, SPEC section 1).

  python -m qdc_jax.main --config=configs/scaling.py --workdir=/tmp/qdc_scaling

1. Data-size sweeps: for each corpus, a GPT-2-style model is pretrained on nested prefixes of
   one shuffled token stream (`config.data.sizes` tokens), each run stopping on its held-out
   (valid) loss; the test loss at the best valid step is the point of L(n).
2. Width sweep: models of `config.widths` on `config.width_corpus` at the largest size: L(N).
3. Intrinsic dimension of each corpus the thesis's way (`embed.sampled_token_embeddings`:
   a random window per test document, 32 tokens per document, MLE K = 20 on batches of
   4096) under the corpus's largest-data model, per layer and per context position, and
   under every width-sweep model (thesis figure 2.4).
4. Fits: alpha_D_hat (log test loss vs log n, with its standard error) against the predicted
   2 / (2 + d); alpha_N_hat against 2 / d (figures 2.2, 2.3); table 2.1 recomputed.
5. The manifold check (`scaling/manifold.py`): a Lipschitz target on a d-manifold regressed by
   a small transformer over data sizes, fitted alpha_D against 2 / (2 + d), estimated ID
   against the true d.

Every run is one unit in `<workdir>/runs/<name>` (its own `fit` checkpoints, settings
fingerprint and `result.json`): a killed job resumes inside the unit it was in, and finished
units are read back, never rerun. report.md, report.json and PNGs come last.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from qdc_jax import config_lib
from qdc_jax import embed
from qdc_jax import fit
from qdc_jax import storage
from qdc_jax import tokenizers
from qdc_jax import train
from qdc_jax.data import pipeline
from qdc_jax.models import heads
from qdc_jax.models import transformer
from qdc_jax.rl import common
from qdc_jax.scaling import corpora
from qdc_jax.scaling import intrinsic_dim
from qdc_jax.scaling import laws
from qdc_jax.scaling import manifold
from qdc_jax.scaling import report as report_lib


def _model_config(c, d_model=None) -> transformer.ModelConfig:
  cfg = config_lib.model_config(c)
  if d_model is None or d_model == cfg.d_model:
    return cfg
  heads_ = max(1, d_model // cfg.head_dim)
  return cfg.replace(d_model=d_model, num_heads=heads_, num_kv_heads=heads_, d_ff=4 * d_model)


def non_embedding_params(params) -> int:
  """Parameters outside the token / position embeddings (Kaplan et al.'s N)."""
  p = params if isinstance(params, dict) else {}
  emb = sum(int(np.prod(p[k].shape)) for k in ("embedding", "pos_embedding") if k in p)
  return transformer.count_params(params) - emb


class Unit:
  """One run's directory: refuses other settings, and holds its result once finished."""

  def __init__(self, workdir: str, name: str, settings: dict):
    self.dir = storage.join(workdir, "runs", name)
    self.name = name
    self.path = storage.join(self.dir, "result.json")
    # stop_at_step is when to pause, not what is computed.
    common.check_settings(self.dir, settings, may_change=("train.stop_at_step",))
    self.result = storage.read_json(self.path)

  def finish(self, result: dict) -> dict:
    storage.write_json(self.path, result)
    self.result = result
    return result


def _best_and_test(tc, unit: Unit, *, model, objective, data, valid, test, mesh, rules):
  """fit with early stopping; the test metrics of the params of the best valid step.
  None when the run stopped at train.stop_at_step (resume later)."""
  t0 = time.time()
  res = fit.fit(tc, model=model, workdir=unit.dir, mesh=mesh, rules=rules, data=data,
                eval_data=valid, objective=objective, name="train")
  if not res.finished(tc):
    return None, None, None
  best = res.eval_metrics.get("best_step", res.step)
  params, shardings = fit.load_params(unit.dir, model=model, tc=tc, mesh=mesh, rules=rules,
                                      step=best, objective=objective)
  eval_fn = train.jit_eval_step(
      functools.partial(train.eval_step, model=model, loss_fn=objective.loss_sums), shardings,
      mesh, rules)
  test_m = fit.evaluate(params, eval_fn, test, mesh, rules)
  out = {"best_step": best, "steps_run": res.step, "stopped_early": res.stopped_early,
         "valid_loss": res.eval_metrics.get("best_eval_loss"), "test_loss": test_m["eval_loss"],
         "train_seconds": time.time() - t0}
  return out, params, shardings


def _text_id(params, shardings, model, docs, ic, *, layers, mesh, rules) -> dict:
  """MLE (mean of per-point estimates) of the test documents' token embeddings per layer
  (None = final), and per context-position bucket at the final layer."""
  def one(layer, positions=None):
    x = embed.sampled_token_embeddings(
        params, docs, model=model, layer=layer, context=ic.context, per_doc=ic.per_doc,
        seed=ic.seed, positions=positions, mesh=mesh, rules=rules, param_shardings=shardings)
    est = intrinsic_dim.estimate_in_batches(x, k=ic.k, batch=ic.batch, seed=ic.seed)
    return {"id": est.dimension, "stderr": est.stderr, "interval": list(est.interval),
            "points": int(len(x)), "duplicates": est.duplicates}
  out = {"final": one(None)}
  out["layers"] = {str(l): one(l) for l in layers}
  width = min(ic.context, max(len(d) for d in docs))
  edges = np.linspace(0, width, ic.position_buckets + 1).astype(int)
  out["positions"] = [{"lo": int(lo), "hi": int(hi), **one(None, (int(lo), int(hi)))}
                      for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
  return out


def _lm_unit(config, workdir, corpus, name, d_model, n, splits, *, with_id, mesh, rules):
  cfg = _model_config(config.model, d_model)
  model = transformer.Transformer(cfg)
  tc = config.train
  dc = config.data
  settings = {"model": dataclasses.asdict(cfg), "train": tc.to_dict(),
              "data": {"seed": dc.seed, "valid_tokens": dc.valid_tokens,
                       "test_tokens": dc.test_tokens},
              "corpus": corpus.provenance, "id": config.id.to_dict() if with_id else None}
  unit = Unit(workdir, f"{name}_d{cfg.d_model}_n{n}", settings)
  if unit.result is not None:
    return unit.result
  train_rows = pipeline.lm_windows(splits["train"][:n + 1], tc.seq_len)
  data = pipeline.array_dataset(train_rows, batch_size=tc.batch_size, seed=tc.seed)
  out, params, shardings = _best_and_test(tc, unit, model=model, objective=train.LM,
                                          data=data, valid=splits["valid"],
                                          test=splits["test"], mesh=mesh, rules=rules)
  if out is None:
    return None
  out.update(corpus=name, d_model=cfg.d_model, tokens=n, train_rows=len(train_rows["inputs"]),
             params=transformer.count_params(params),
             non_embedding_params=non_embedding_params(params))
  if with_id:
    layers = range(cfg.num_layers) if config.id.layers == "all" else ()
    out["id"] = _text_id(params, shardings, model, splits["id_docs"], config.id,
                         layers=layers, mesh=mesh, rules=rules)
  logging.info("%s: test loss %.4f (best step %d)%s", unit.name, out["test_loss"],
               out["best_step"], f", ID {out['id']['final']['id']:.2f}" if with_id else "")
  return unit.finish(out)


def _corpus_splits(corpus, tok, config) -> dict:
  dc, tc = config.data, config.train
  stream = corpora.token_stream(corpus.train, tok, max_tokens=max(dc.sizes) + 1, seed=dc.seed)
  batch = tc.batch_size // tc.accum_steps
  held = {k: pipeline.array_eval_batches(pipeline.lm_windows(corpora.token_stream(
      docs, tok, max_tokens=t + 1, seed=dc.seed), tc.seq_len), batch_size=batch)
          for k, docs, t in (("valid", corpus.valid, dc.valid_tokens),
                             ("test", corpus.test, dc.test_tokens))}
  id_docs = corpora.document_tokens(corpus.test[:config.id.max_docs or None], tok)
  return {"train": stream, **held, "id_docs": id_docs}


def _manifold_unit(config, workdir, dim, n, *, mesh, rules):
  mc = config.manifold
  cfg = _model_config(mc.model)
  ambient = max(mc.ambient, 3 * dim)
  ambient += -ambient % mc.chunks
  obj = manifold.objective(mc.chunks, ambient // mc.chunks)
  settings = {"model": dataclasses.asdict(cfg), "dim": dim,
              "manifold": {k: v for k, v in mc.to_dict().items() if k not in ("dims", "sizes")}}
  unit = Unit(workdir, f"manifold_d{dim}_n{n}", settings)
  if unit.result is not None:
    return unit.result
  draw = functools.partial(manifold.make, dim=dim, ambient=ambient, problem_seed=mc.seed)
  tr = draw(n, sample_seed=mc.seed + 1)
  mean, std = float(tr.y.mean()), float(tr.y.std() + 1e-8) if n > 1 else 1.0
  cols = functools.partial(manifold.columns, chunks=mc.chunks, mean=mean, std=std)
  batch = mc.train.batch_size // mc.train.accum_steps
  valid = pipeline.array_eval_batches(cols(draw(mc.valid_points, sample_seed=mc.seed + 2)),
                                      batch_size=batch)
  test_data = draw(mc.test_points, sample_seed=mc.seed + 3)
  test = pipeline.array_eval_batches(cols(test_data), batch_size=batch)
  data = pipeline.array_dataset(cols(tr), batch_size=mc.train.batch_size, seed=mc.seed)
  out, _, _ = _best_and_test(mc.train, unit, model=heads.Regressor(cfg), objective=obj,
                             data=data, valid=valid, test=test, mesh=mesh, rules=rules)
  if out is None:
    return None
  # In units of the target's own variance on the test draw (not the train draw's).
  out.update(dim=dim, points=n, ambient=ambient,
             test_mse_over_var=out["test_loss"] * std ** 2 / float(test_data.y.var()))
  logging.info("%s: test MSE / var %.4f", unit.name, out["test_mse_over_var"])
  return unit.finish(out)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.require(config, ["model.name", "data.sizes", "corpora", "train.steps", "id.k"])
  if len(config.data.sizes) < 3:
    raise ValueError(f"data.sizes={config.data.sizes}: a fit with an uncertainty needs >= 3")
  if config.train.patience and config.train.keep < config.train.patience + 1:
    raise ValueError(f"train.keep={config.train.keep} < train.patience + 1: the best step's "
                     f"checkpoint would be gone when the run stops")
  mesh, rules = config_lib.make_mesh(config.mesh)
  tok = tokenizers.ByteTokenizer()
  if config_lib.model_config(config.model).vocab_size < tok.vocab_size:
    raise ValueError(f"model vocab_size < {tok.vocab_size} (byte-level); set "
                     f"--config.model.vocab_size={tok.vocab_size}")
  t_start = time.time()
  results: dict = {"corpora": {}, "widths": [], "manifold": [], "incomplete": False}
  names = [n for n in config.corpus_order if n]
  n_max = max(config.data.sizes)
  for name in names:
    corpus = corpora.load(name, config.corpora[name])
    splits = _corpus_splits(corpus, tok, config)
    rows = [_lm_unit(config, workdir, corpus, name, None, n, splits,
                     with_id=(n == n_max), mesh=mesh, rules=rules) for n in config.data.sizes]
    results["corpora"][name] = {"provenance": corpus.provenance, "runs": rows}
    if name == config.width_corpus:
      results["widths"] = [_lm_unit(config, workdir, corpus, name, w, n_max, splits,
                                    with_id=True, mesh=mesh, rules=rules)
                           for w in config.widths]
  for dim in config.manifold.dims:
    results["manifold"] += [_manifold_unit(config, workdir, dim, n, mesh=mesh, rules=rules)
                            for n in config.manifold.sizes]
  flat = ([r for c in results["corpora"].values() for r in c["runs"]] + results["widths"]
          + results["manifold"])
  if any(r is None for r in flat):
    logging.info("Stopped at train.stop_at_step; rerun on %s to resume.", workdir)
    results["incomplete"] = True
    return results
  results["manifold_id"] = manifold.id_against_truth(
      config.manifold.dims, n=config.manifold.id_points, ambient=config.manifold.ambient)
  results["fits"] = report_lib.fits(results)
  results["table_2_1"] = laws.table_2_1()
  results["seconds"] = time.time() - t_start
  report_lib.write(workdir, results, config)
  return results
