"""Helpers for ml_collections configs: model/mesh sections, validation, presets."""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections
from ml_collections.config_dict import placeholder

from qdc_jax import sharding as sharding_lib
from qdc_jax.models import configs as model_configs
from qdc_jax.models import transformer

# ModelConfig fields a command line may override on top of a named model (None = keep).
_MODEL_OVERRIDES = {
    "vocab_size": int, "d_model": int, "num_layers": int, "num_heads": int,
    "num_kv_heads": int, "head_dim": int, "d_ff": int, "sliding_window": int,
    "max_len": int, "dtype": str, "param_dtype": str, "remat": bool, "scan_layers": bool,
}


def model_section(name: str, **fields) -> ml_collections.ConfigDict:
  """`config.model`: a named model plus typed, optional field overrides."""
  c = ml_collections.ConfigDict()
  c.name = name  # a key of qdc_jax.models.configs.CONFIGS
  for k, typ in _MODEL_OVERRIDES.items():
    c[k] = fields.pop(k) if k in fields else placeholder(typ)
  if fields:
    raise ValueError(f"model_section: unknown fields {sorted(fields)}")
  return c


def model_config(c: ml_collections.ConfigDict) -> transformer.ModelConfig:
  overrides = {k: c[k] for k in _MODEL_OVERRIDES if k in c and c[k] is not None}
  return model_configs.get_model_config(c.name, **overrides)


def mesh_section(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.shape = tuple(shape)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.rules = placeholder(tuple)  # logical-axis rules; None = qdc_jax.sharding.DEFAULT_RULES
  return c


def make_mesh(c: ml_collections.ConfigDict):
  """(mesh, rules) from `config.mesh`."""
  return sharding_lib.make_mesh(tuple(c.shape)), sharding_lib.rules_from_config(c.rules)


def require(config: ml_collections.ConfigDict, paths: Iterable[str]) -> None:
  """Fail early, naming the key, when a config misses a field an experiment needs."""
  missing = []
  for path in paths:
    node: Any = config
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        missing.append(path)
        break
      node = node[part]
  if missing:
    raise ValueError(f"Config {config.get('experiment', '?')!r} is missing required field(s) "
                     f"{missing}; start from a file in configs/ that sets them.")
