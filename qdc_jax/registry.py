"""One string registry for everything a config picks by name.

Kinds: "experiment", "tokenizer", and later "reward", "mutator", "annotator", "filter",
"strategy". Entries are registered either as objects or as lazy "module:attribute" strings,
so choosing an experiment does not import every other workload.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

_REGISTRY: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str, obj: Any = None) -> Any:
  """`register(kind, name, obj)`, or `@register(kind, name)` as a decorator."""
  def add(o):
    table = _REGISTRY.setdefault(kind, {})
    if name in table and table[name] is not o:
      raise ValueError(f"{kind} {name!r} is registered twice")
    table[name] = o
    return o
  return add if obj is None else add(obj)


def names(kind: str) -> list[str]:
  return sorted(_REGISTRY.get(kind, {}))


def get(kind: str, name: str) -> Any:
  """The entry, importing lazy "module:attr" entries; unknown names list the valid ones."""
  table = _REGISTRY.get(kind, {})
  if name not in table:
    raise KeyError(f"Unknown {kind} {name!r}; valid choices: {', '.join(names(kind)) or 'none'}")
  obj = table[name]
  if isinstance(obj, str) and ":" in obj:
    module, attr = obj.split(":")
    obj = getattr(importlib.import_module(module), attr)
  return obj


# Experiments: one run(config, workdir) each.
register("experiment", "lm", "qdc_jax.experiments.lm:run")
register("experiment", "evaluate", "qdc_jax.experiments.evaluate:run")
register("experiment", "sparq", "qdc_jax.experiments.sparq:run")
register("experiment", "sft", "qdc_jax.experiments.sft:run")
register("experiment", "ei", "qdc_jax.experiments.ei:run")
register("experiment", "ppo", "qdc_jax.experiments.ppo:run")
register("experiment", "rcrl", "qdc_jax.experiments.rcrl:run")
register("experiment", "scaling", "qdc_jax.experiments.scaling:run")
register("experiment", "glore", "qdc_jax.experiments.glore:run")
register("experiment", "preference_rm", "qdc_jax.experiments.preference_rm:run")
register("experiment", "ilql", "qdc_jax.experiments.ilql:run")
register("experiment", "qdc", "qdc_jax.experiments.qdc:run")

# RL rewards: fn(items, completions, *, tokenizer) -> qdc_jax.rl.rewards.Rewards.
register("reward", "sparse", "qdc_jax.rl.rewards:sparse")
register("reward", "dense", "qdc_jax.rl.rewards:dense")
register("reward", "model", "qdc_jax.rl.reward_models:RewardModelReward")

# SPARQ mutators (generators that are not language models).
register("mutator", "arith_programmatic", "qdc_jax.sparq.agents:ProgrammaticGenerator")

register("tokenizer", "char", "qdc_jax.tokenizers:CharTokenizer")
register("tokenizer", "byte", "qdc_jax.tokenizers:ByteTokenizer")
register("tokenizer", "sentencepiece", "qdc_jax.tokenizers:SentencePieceTokenizer")
