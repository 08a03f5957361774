"""Solve a set of questions with a model and score it: greedy + K samples -> metrics.

All samples of a call go through the batched KV-cache sampler (K rows per prompt); scoring is
host-side text work (`qdc_jax.eval.metrics.summarize`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax

from qdc_jax import sampling
from qdc_jax.eval import metrics


def solve_and_score(params, prompts: Sequence[str], references: Sequence[Any], *, model,
                    tokenizer, k: int, temperature: float, max_new_tokens: int,
                    rng: jax.Array, ks: Sequence[int] = (1, 4, 16), batch_size: int = 64,
                    mesh=None, rules=None, param_shardings=None,
                    stop_strings: Sequence[str] = (),
                    scorer: Optional[Callable[[Sequence[str], Sequence[str]], Any]] = None
                    ) -> tuple[dict, dict]:
  """Returns (metrics, outputs): metrics as `metrics.summarize` plus timing; outputs holds the
  greedy and sampled completions per prompt. With `scorer(prompts, texts) -> scores` (e.g. an
  ORM's `reward_models.Scorer.final_scores`) the samples are also reranked: rerank@k."""
  common = dict(model=model, tokenizer=tokenizer, mesh=mesh, rules=rules,
                param_shardings=param_shardings, batch_size=batch_size,
                stop_strings=tuple(stop_strings))
  t0 = time.perf_counter()
  greedy = sampling.generate_text(
      params, prompts, sp=sampling.SamplingParams(max_new_tokens=max_new_tokens, greedy=True),
      rng=rng, **common)
  t1 = time.perf_counter()
  samples = sampling.generate_text(
      params, prompts, sp=sampling.SamplingParams(max_new_tokens=max_new_tokens,
                                                  num_samples=k, temperature=temperature),
      rng=jax.random.fold_in(rng, 1), **common) if k > 0 else [[g[0]] for g in greedy]
  t2 = time.perf_counter()
  scores = None
  if scorer is not None:
    flat = [(p, s) for p, row in zip(prompts, samples) for s in row]
    flat_scores = list(scorer([p for p, _ in flat], [s for _, s in flat]))
    scores, at = [], 0
    for row in samples:
      scores.append(flat_scores[at:at + len(row)])
      at += len(row)
  result = metrics.summarize(samples, list(references), [x for x in ks if x <= max(k, 1)],
                             greedy=[g[0] for g in greedy], scores=scores)
  result["greedy_seconds"] = t1 - t0
  result["sample_seconds"] = t2 - t1
  result["samples_per_s"] = len(prompts) * max(k, 1) / max(t2 - t1, 1e-9)
  return result, {"greedy": [g[0] for g in greedy], "samples": samples}
