"""Params-only model directories: the shipped lab models and exports of trained runs.

Layout of a model directory:
  model.json        {"model": ModelConfig fields, "tokenizer": {...}, "notes": {...}}
  params/<step>/    an orbax checkpoint of the parameter tree (qdc_jax.checkpoint, so shape
                    checks, checksums and restore-into-shardings come with it)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp

from qdc_jax import checkpoint as ckpt_lib
from qdc_jax import sharding as sharding_lib
from qdc_jax import tokenizers
from qdc_jax.models import transformer

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def asset_path(name: str) -> str:
  """`qdc_jax/assets/<name>` (e.g. 'lab_student', 'lab_generator')."""
  return os.path.join(ASSETS_DIR, name)


def save_model(directory: str, cfg: transformer.ModelConfig, params: Any, *,
               tokenizer: Optional[dict] = None, notes: Optional[dict] = None) -> None:
  """Writes a fresh model directory (replacing one that exists, never half-written)."""
  meta = {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer or {}, "notes": notes or {}}
  tmp = directory.rstrip("/") + ".tmp"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  with ckpt_lib.Checkpointer(os.path.join(tmp, "params"), save_every=1, keep=1,
                             async_save=False) as c:
    c.maybe_save(0, params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump(meta, f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_model_config(directory: str) -> tuple[transformer.ModelConfig, dict]:
  path = os.path.join(directory, "model.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No model directory at {directory} (missing model.json); point "
                            f"the config's checkpoint/model_dir flag at a directory written by "
                            f"qdc_jax.model_io.save_model")
  with open(path) as f:
    meta = json.load(f)
  fields = dict(meta["model"])
  fields["layer_pattern"] = tuple(fields["layer_pattern"])
  return transformer.ModelConfig(**fields), meta


def load_model(directory: str, *, mesh=None, rules=None):
  """(ModelConfig, params, tokenizer or None, meta, param shardings), restored into the
  shardings of `mesh` (default: all devices on the data axis)."""
  cfg, meta = load_model_config(directory)
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1))
  rules = rules or sharding_lib.DEFAULT_RULES
  model = transformer.Transformer(cfg)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  abstract = sharding_lib.abstract_with_shardings(init, mesh, rules)
  with ckpt_lib.Checkpointer(os.path.join(directory, "params"), save_every=1) as c:
    params, _ = c.restore(abstract)
  tok_meta = meta.get("tokenizer") or {}
  tok = None
  if tok_meta.get("kind") == "char":
    tok = tokenizers.make_tokenizer("char", alphabet=tok_meta["alphabet"])
  elif tok_meta.get("kind") == "sentencepiece":
    tok = tokenizers.make_tokenizer("sentencepiece", model_path=tok_meta["path"])
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return cfg, params, tok, meta, shardings
