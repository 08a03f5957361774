"""Language-model training (pretraining / SFT) on (prompt, completion) records.

Default data: the arithmetic lab's student task (question -> step-by-step solution). After
training, greedy accuracy on held-out in-distribution and OOD lab problems is measured with
the KV-cache sampler and written to `<workdir>/report.json`.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging

from qdc_jax import config_lib
from qdc_jax import fit
from qdc_jax import sampling
from qdc_jax import tokenizers
from qdc_jax.data import arith
from qdc_jax.data import jsonl
from qdc_jax.models import transformer


def make_tokenizer(c):
  if c.kind == "char":
    return tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
  return tokenizers.make_tokenizer(c.kind, model_path=c.path)


def lab_records(dc):
  """Train / eval records and test problems of the arithmetic lab's student task."""
  train = arith.make_split("in_dist", dc.train_size, seed=dc.seed)
  held = arith.make_split("in_dist", dc.eval_size + dc.test_size, seed=dc.seed + 1)
  train_texts = {p.text for p in train}
  held = [p for p in held if p.text not in train_texts]
  eval_p, test_p = held[:dc.eval_size], held[dc.eval_size:]
  ood = arith.make_split("ood", dc.test_size, seed=dc.seed + 2)
  return ([p.to_record() for p in train], [p.to_record() for p in eval_p],
          {"in_dist": test_p, "ood": ood})


def lab_accuracy(params, problems, *, model, tokenizer, rng, max_new_tokens, mesh, rules,
                 param_shardings) -> dict:
  """Greedy accuracy: the final answer line must equal the oracle answer."""
  sp = sampling.SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
  prompts = [p.to_record()["prompt"] for p in problems]
  outs = sampling.generate_text(params, prompts, model=model, tokenizer=tokenizer, sp=sp,
                                rng=rng, mesh=mesh, rules=rules,
                                param_shardings=param_shardings)
  answers = [arith.parse_solution(o[0]).answer for o in outs]
  correct = sum(a == p.answer for a, p in zip(answers, problems))
  return {"greedy_accuracy": correct / max(len(problems), 1), "n": len(problems),
          "unparsed": sum(a is None for a in answers),
          "example": {"prompt": prompts[0], "completion": outs[0][0]} if outs else None}


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["model.name", "train.steps", "data.source", "tokenizer.kind"])
  mesh, rules = config_lib.make_mesh(config.mesh)
  model = transformer.Transformer(config_lib.model_config(config.model))
  tokenizer = make_tokenizer(config.tokenizer)
  if model.config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model vocab_size={model.config.vocab_size} < tokenizer vocab_size="
                     f"{tokenizer.vocab_size}; set --config.model.vocab_size")
  tests = {}
  if config.data.source == "arith":
    train_records, eval_records, tests = lab_records(config.data)
  elif config.data.source == "jsonl":
    train_records = jsonl.read_records(config.data.train_path)
    eval_records = jsonl.read_records(config.data.eval_path) if config.data.eval_path else []
  else:
    raise ValueError(f"Unknown data.source {config.data.source!r}; choose 'arith' or 'jsonl'")
  logging.info("model: %s | %d train / %d eval records", model.config, len(train_records),
               len(eval_records))
  t0 = time.time()
  result = fit.fit(config.train, model=model, train_records=train_records,
                   eval_records=eval_records, tokenizer=tokenizer, workdir=workdir, mesh=mesh,
                   rules=rules)
  report = {"steps": result.step, "train_seconds": time.time() - t0, **result.eval_metrics}
  for split, problems in tests.items():
    acc = lab_accuracy(result.params, problems, model=model, tokenizer=tokenizer,
                       rng=jax.random.PRNGKey(0), max_new_tokens=config.eval.max_new_tokens,
                       mesh=mesh, rules=rules, param_shardings=result.param_shardings)
    report[split] = acc
    logging.info("%s greedy accuracy %.3f (%d problems, %d unparsed)", split,
                 acc["greedy_accuracy"], acc["n"], acc["unparsed"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "report.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report
