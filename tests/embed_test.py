"""Model embeddings of token sequences (the text-ID sample) against a one-document-at-a-time
reference, on one device and on a (2, 2, 2) mesh; and the text-ID command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax import embed, sharding
from qdc_jax.models import configs
from qdc_jax.models import transformer as T


def _model():
  cfg = configs.get_model_config("lab_tiny", num_layers=3, sliding_window=4)
  model = T.Transformer(cfg)
  params = T.nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
  return model, params


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_sampled_token_embeddings_are_the_documents_own_hidden_states(layer):
  model, params = _model()
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 100, n)) for n in (5, 17, 9, 30, 2, 12, 21)]
  got = embed.sampled_token_embeddings(params, docs, model=model, layer=layer, context=64,
                                       per_doc=6, seed=3, batch_size=3)
  # Reference: every position of every document, one document per row of one padded batch
  # (causal attention: right padding changes nothing before it).
  padded = np.zeros((len(docs), 32), np.int32)
  for i, d in enumerate(docs):
    padded[i, :len(d)] = d
  full = np.asarray(embed.hidden_states(params, jnp.asarray(padded), model=model, layer=layer))
  pool = np.concatenate([full[i, :len(d)] for i, d in enumerate(docs)])
  assert got.shape == (sum(min(6, len(d)) for d in docs), model.config.d_model)
  dist = np.sqrt(((got[:, None, :] - pool[None]) ** 2).sum(-1))
  nearest = dist.argmin(1)
  assert dist.min(1).max() < 1e-4  # every vector is one of the documents' token vectors
  if layer != 0:  # layer 0 is the embedding table: repeated tokens share a vector there
    assert len(set(nearest.tolist())) == len(got)  # positions drawn without replacement
  again = embed.sampled_token_embeddings(params, docs, model=model, layer=layer, context=64,
                                         per_doc=6, seed=3, batch_size=3)
  np.testing.assert_array_equal(got, again)  # seeded
  # The context-position ablation: only window positions 2..5 (docs of 2 tokens give none).
  where = np.concatenate([np.arange(len(d)) for d in docs])
  part = embed.sampled_token_embeddings(params, docs, model=model, layer=layer, context=64,
                                        per_doc=3, seed=3, batch_size=3, positions=(2, 6))
  assert len(part) == 3 * 6
  dist = np.sqrt(((part[:, None, :] - pool[None]) ** 2).sum(-1))
  if layer != 0:
    assert set(where[dist.argmin(1)].tolist()) <= {2, 3, 4, 5}


def test_windows_shorter_than_documents_and_a_mesh_give_the_same_sample():
  model, params = _model()
  rng = np.random.default_rng(1)
  docs = [list(rng.integers(3, 100, n)) for n in (40, 25, 33, 50, 28, 41, 60, 37, 45)]
  single = embed.sampled_token_embeddings(params, docs, model=model, context=16, per_doc=4,
                                          seed=5, batch_size=4)
  assert single.shape == (36, model.config.d_model)
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  shardings = sharding.logical_to_shardings(T.nn.get_partition_spec(abstract), mesh, rules)
  sharded = embed.sampled_token_embeddings(
      jax.device_put(params, shardings["params"]), docs, model=model, context=16, per_doc=4,
      seed=5, batch_size=4, mesh=mesh, rules=rules, param_shardings=shardings["params"])
  np.testing.assert_allclose(sharded, single, atol=1e-5)
  with pytest.raises(ValueError, match="layer=7"):
    embed.hidden_states(params, jnp.ones((1, 4), jnp.int32), model=model, layer=7)


def test_text_id_command_line_on_the_lab_student(tmp_path):
  texts = tmp_path / "docs.jsonl"
  rows = [{"prompt": f"Question: What is {i} + {i * 7 % 13}?\nSolution:\n",
           "completion": f"{i} + {i * 7 % 13} = {i + i * 7 % 13}. The answer is "
                         f"{i + i * 7 % 13}."} for i in range(300)]
  texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "id"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "qdc_jax.scaling.intrinsic_dim", f"--texts={texts}",
       "--layers=0,2,4", "--position_buckets=0,20,200", "--per_doc=8", "--batch=1000",
       "--k=10", f"--out={out}"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((out / "id.json").read_text())
  assert [(r["layer"], r["positions"]) for r in res["results"]] == [
      (l, b) for l in (0, 2, 4) for b in ([0, 20], [20, 200])]
  rows = {(r["layer"], tuple(r["positions"])): r for r in res["results"]}
  # Layer 0 is the embedding table (RoPE adds no position): past the shared "Question: What
  # is " prefix its vectors are the char vocabulary's few dozen, every point has a duplicate,
  # and the row says so instead of stopping the run.
  assert "duplicates" in rows[(0, (20, 200))]["error"]
  # The shared prefix makes most points of positions 0..19 duplicates at every layer: counted.
  for layer in (2, 4):
    assert rows[(layer, (0, 20))]["duplicates"] > 0.8 * rows[(layer, (0, 20))]["points"]
    r = rows[(layer, (20, 200))]
    assert r["points"] == 2400 and r["batches"] == 2  # every text is over 40 characters
    assert r["duplicates"] < 0.1 * r["points"]
    assert 1 < r["interval"][0] <= r["dimension"] <= r["interval"][1] < 128
  assert (out / "id_vs_layer.png").stat().st_size > 1000
  assert (out / "id_vs_position.png").stat().st_size > 1000
