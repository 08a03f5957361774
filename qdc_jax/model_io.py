"""Params-only model directories: the shipped lab models and exports of trained runs.

Layout of a model directory:
  model.json        {"model": ModelConfig fields, "tokenizer": {...}, "notes": {...},
                    "kind": "lm" | "reward_model"}: what the parameter tree is (a
                    `transformer.Transformer`, or a `heads.RewardModel`: {"trunk", "head"})
  params/<step>/    an orbax checkpoint of the parameter tree (qdc_jax.checkpoint, so shape
                    checks, checksums and restore-into-shardings come with it)
  tokenizer.model   SentencePiece models: a copy of the tokenizer, which model.json names
                    relative to the directory, so a directory can be moved or copied to a
                    bucket and still load
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from qdc_jax import checkpoint as ckpt_lib
from qdc_jax import sharding as sharding_lib
from qdc_jax import storage
from qdc_jax import tokenizers
from qdc_jax.models import transformer

MODEL_JSON = "model.json"
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece model's copy inside the directory
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def asset_path(name: str) -> str:
  """`qdc_jax/assets/<name>` (e.g. 'lab_student', 'lab_generator')."""
  return os.path.join(ASSETS_DIR, name)


KINDS = ("lm", "reward_model", "ilql")


def module_for(kind: str, cfg: transformer.ModelConfig):
  """The Flax module whose parameters a model directory of `kind` holds."""
  if kind == "lm":
    return transformer.Transformer(cfg)
  if kind == "reward_model":
    from qdc_jax.models import heads  # pylint: disable=g-import-not-at-top
    return heads.RewardModel(cfg)
  if kind == "ilql":
    from qdc_jax.rl import ilql  # pylint: disable=g-import-not-at-top
    return ilql.ILQLModel(cfg)
  raise ValueError(f"Unknown model kind {kind!r}; one of {KINDS}")


def save_model(directory: str, cfg: transformer.ModelConfig, params: Any, *,
               tokenizer: Optional[dict] = None, notes: Optional[dict] = None,
               kind: str = "lm") -> None:
  """Writes a model directory (local or gs://); call on every process (collective).

  model.json is written last and is the commit point: a directory being replaced loses its
  model.json first, so a kill midway leaves a directory `load_model` refuses, never a model
  with half-new weights.

  `tokenizer` is the metadata `load_model` returns (`meta["tokenizer"]`): {"kind": "char",
  "alphabet": ...} or {"kind": "sentencepiece", "path": FILE}; a SentencePiece FILE is copied
  into the directory as tokenizer.model, so the directory does not depend on where it came from.
  """
  tokenizer = dict(tokenizer or {})
  meta_path = storage.join(directory, MODEL_JSON)
  tok_copy = storage.join(directory, TOKENIZER_FILE)
  tok_bytes = None  # the tokenizer to copy in; only the writing process reads it
  if tokenizer.get("kind") == "sentencepiece":
    source = tokenizer["path"]
    if not storage.exists(source):
      raise FileNotFoundError(f"The tokenizer {source} of the model being saved to {directory} "
                              f"does not exist (moved or deleted since the model loaded?)")
    if os.fspath(source) != tok_copy:  # read before anything in `directory` is touched
      tok_bytes = storage.read_bytes(source) if storage.is_writer() else b""
    tokenizer["path"] = TOKENIZER_FILE
  module_for(kind, cfg)  # an unknown kind fails before anything is written
  meta = {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer, "notes": notes or {},
          "kind": kind}
  storage.barrier(f"save-model:{directory}")  # readers of the old model are done
  if storage.is_writer() and storage.exists(meta_path):
    storage.path(meta_path).unlink()
  if tok_bytes is not None:
    storage.write_bytes(tok_copy, tok_bytes)
  storage.rmtree(storage.join(directory, "params"))
  with ckpt_lib.Checkpointer(storage.join(directory, "params"), save_every=1, keep=1,
                             async_save=False) as c:
    c.maybe_save(0, params, force=True)
  storage.write_json(meta_path, meta)


def load_model_config(directory: str) -> tuple[transformer.ModelConfig, dict]:
  path = storage.join(directory, MODEL_JSON)
  if not storage.exists(path):
    raise FileNotFoundError(f"No model directory at {directory} (missing {MODEL_JSON}, or "
                            f"a save was interrupted); point the config's checkpoint/"
                            f"model_dir flag at a directory written by "
                            f"qdc_jax.model_io.save_model")
  meta = storage.read_json(path)
  fields = dict(meta["model"])
  fields["layer_pattern"] = tuple(fields["layer_pattern"])
  return transformer.ModelConfig(**fields), meta


def load_model(directory: str, *, mesh=None, rules=None, kind: str = "lm"):
  """(ModelConfig, params, tokenizer or None, meta, param shardings), restored into the
  shardings of `mesh` (default: all devices on the data axis). `kind` is what the caller
  expects (a directory of another kind is refused, naming both)."""
  cfg, meta = load_model_config(directory)
  found = meta.get("kind", "lm")  # directories written before kinds existed are LMs
  if found != kind:
    raise ValueError(f"{directory} holds a {found!r} model, not the {kind!r} model expected "
                     f"here; point the flag at a directory of the right kind")
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1))
  rules = rules or sharding_lib.DEFAULT_RULES
  model = module_for(kind, cfg)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  abstract = sharding_lib.abstract_with_shardings(init, mesh, rules)
  with ckpt_lib.Checkpointer(storage.join(directory, "params"), save_every=1) as c:
    params, _ = c.restore(abstract)
  tok = load_tokenizer(directory, meta)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return cfg, params, tok, meta, shardings


def load_tokenizer(directory: str, meta: dict):
  """The tokenizer `meta["tokenizer"]` (a model directory's model.json) describes, or None.

  A SentencePiece path relative to the directory (the copy save_model writes) is resolved,
  in `meta` too, so a directory can move or live in gs:// and re-exports still find it;
  absolute paths come from directories written before the copy existed.
  """
  tok_meta = meta.get("tokenizer") or {}
  if tok_meta.get("kind") == "char":
    return tokenizers.make_tokenizer("char", alphabet=tok_meta["alphabet"])
  if tok_meta.get("kind") != "sentencepiece":
    return None
  tok_path = tok_meta["path"]
  if storage.is_local(tok_path) and not os.path.isabs(tok_path):
    tok_path = storage.join(directory, tok_path)
    meta["tokenizer"] = {**tok_meta, "path": tok_path}
  if not storage.exists(tok_path):
    raise FileNotFoundError(f"{directory}/{MODEL_JSON} names the tokenizer {tok_path}, "
                            f"which does not exist; copy the model's tokenizer.model there")
  return tokenizers.make_tokenizer("sentencepiece", model_path=tok_path)


def same_tokenizer(a: dict, b: dict) -> bool:
  """Whether two loaded models' `meta["tokenizer"]` encode alike: equal alphabets, or
  SentencePiece files with equal bytes (each model directory holds its own copy)."""
  a, b = a or {}, b or {}
  if a.get("kind") != b.get("kind"):
    return False
  if a.get("kind") == "sentencepiece":
    return a["path"] == b["path"] or storage.read_bytes(a["path"]) == storage.read_bytes(
        b["path"])
  return a == b
