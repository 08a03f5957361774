"""Language-model training (pretraining / SFT) on (prompt, completion) records.

Data: the arithmetic lab's student task (question -> step-by-step solution) or generator task
(parent problem + solution -> child problem + intended solution), or JSONL records. After
training the params are exported to `<workdir>/model` (a `qdc_jax.model_io` directory) and
measured: the student's greedy accuracy and pass@k on unseen in-distribution and OOD lab
problems; the generator's share of children that parse, are valid, and differ from the parent.
Everything lands in `<workdir>/report.json`.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from qdc_jax import config_lib
from qdc_jax import fit
from qdc_jax import model_io
from qdc_jax import sampling
from qdc_jax import tokenizers
from qdc_jax import storage
from qdc_jax.data import arith
from qdc_jax.data import jsonl
from qdc_jax.data import lab_tasks
from qdc_jax.eval import solve
from qdc_jax.models import transformer


def make_tokenizer(c):
  if c.kind == "char":
    return tokenizers.make_tokenizer("char", alphabet=arith.ALPHABET)
  return tokenizers.make_tokenizer(c.kind, model_path=c.path)


def lab_records(dc):
  """(train records, eval records) of the lab task `dc.task`; test problems never train."""
  exclude = (lab_tasks.test_problems("in_dist", dc.test_size)
             + lab_tasks.test_problems("ood", dc.test_size))
  if dc.task == "student":
    train = lab_tasks.student_problems(dc.train_size, dc.seed, dc.bridge_fraction)
    held = arith.make_split("in_dist", dc.eval_size, seed=dc.seed + 1)
    train = lab_tasks.without(train, exclude + held)
    return [p.to_record() for p in train], [p.to_record() for p in held]
  if dc.task == "generator":
    parents = lab_tasks.without(lab_tasks.student_problems(dc.train_size, dc.seed,
                                                           dc.bridge_fraction), exclude)
    held = arith.make_split("in_dist", dc.eval_size, seed=dc.seed + 1)
    return (lab_tasks.generator_records(parents, dc.seed),
            lab_tasks.generator_records(held, dc.seed + 1))
  raise ValueError(f"Unknown data.task {dc.task!r}; choose 'student' or 'generator'")


def measure_student(params, *, model, tokenizer, ec, mesh, rules, shardings) -> dict:
  out = {}
  for split in ("in_dist", "ood"):
    problems = lab_tasks.test_problems(split, ec.test_size)
    prompts = [arith.PROMPT_TEMPLATE.format(question=p.text) for p in problems]
    m, _ = solve.solve_and_score(
        params, prompts, [p.answer for p in problems], model=model, tokenizer=tokenizer,
        k=ec.k, temperature=1.0, max_new_tokens=ec.max_new_tokens, ks=(1, 4, ec.k),
        rng=jax.random.PRNGKey(0), mesh=mesh, rules=rules, param_shardings=shardings)
    out[split] = m
    logging.info("%s: greedy accuracy %.3f, pass@%d %.3f", split, m["greedy_accuracy"], ec.k,
                 m.get(f"pass@{ec.k}", float("nan")))
  return out


def measure_generator(params, *, model, tokenizer, ec, mesh, rules, shardings) -> dict:
  """Children of unseen parents, sampled at T=1 as SPARQ does, checked by the oracle."""
  parents = lab_tasks.test_problems("in_dist", ec.test_size)
  sp = sampling.SamplingParams(max_new_tokens=ec.max_new_tokens, temperature=1.0)
  outs = sampling.generate_text(params, [lab_tasks.generator_prompt(p) for p in parents],
                                model=model, tokenizer=tokenizer, sp=sp,
                                rng=jax.random.PRNGKey(0), mesh=mesh, rules=rules,
                                param_shardings=shardings)
  errors: dict[str, int] = {}
  parsed = valid = different = 0
  for parent, (text,) in zip(parents, outs):
    child = lab_tasks.parse_generator_output(text)
    if child.error:
      errors[child.error] = errors.get(child.error, 0) + 1
      continue
    verdict = arith.oracle(child.question, child.intended_answer)
    if not verdict.parses:
      errors["question_does_not_parse"] = errors.get("question_does_not_parse", 0) + 1
      continue
    parsed += 1
    valid += verdict.valid
    different += child.question != parent.text
  n = max(len(parents), 1)
  result = {"n": len(parents), "parse_rate": parsed / n, "valid_rate": valid / n,
            "different_rate": different / n, "failures": errors,
            "example": {"parent": parents[0].text, "child": outs[0][0]}}
  logging.info("generator: %s", {k: v for k, v in result.items() if k != "example"})
  return result


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["model.name", "train.steps", "data.source", "tokenizer.kind"])
  mesh, rules = config_lib.make_mesh(config.mesh)
  model = transformer.Transformer(config_lib.model_config(config.model))
  tokenizer = make_tokenizer(config.tokenizer)
  if model.config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model vocab_size={model.config.vocab_size} < tokenizer vocab_size="
                     f"{tokenizer.vocab_size}; set --config.model.vocab_size")
  if config.data.source == "arith":
    train_records, eval_records = lab_records(config.data)
  elif config.data.source == "jsonl":
    train_records = jsonl.read_records(config.data.train_path)
    eval_records = jsonl.read_records(config.data.eval_path) if config.data.eval_path else []
  else:
    raise ValueError(f"Unknown data.source {config.data.source!r}; choose 'arith' or 'jsonl'")
  logging.info("model: %s | %d train / %d eval records", model.config, len(train_records),
               len(eval_records))
  init_params = None
  if config.get("init_from"):  # fine-tune a model directory (e.g. the shipped student)
    path = config.init_from
    if path.startswith("asset:"):
      path = model_io.asset_path(path[len("asset:"):])
    init_cfg, init_params, _, _, _ = model_io.load_model(path, mesh=mesh, rules=rules)
    shapes = lambda c: (c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.num_kv_heads,
                        c.head_dim, c.d_ff)
    if shapes(init_cfg) != shapes(model.config):
      raise ValueError(f"init_from={config.init_from} has shapes {shapes(init_cfg)}, the model "
                       f"config {shapes(model.config)}: pick a matching model.name")
  t0 = time.time()
  result = fit.fit(config.train, model=model, train_records=train_records,
                   eval_records=eval_records, tokenizer=tokenizer, workdir=workdir, mesh=mesh,
                   rules=rules, init_params=init_params)
  report = {"steps": result.step, "train_seconds": time.time() - t0, **result.eval_metrics}
  if not result.finished(config.train):  # stopped early (train.stop_at_step): resume later
    logging.info("Stopped at step %d of %d; not exporting.", result.step, config.train.steps)
    return report
  tok_meta = ({"kind": "char", "alphabet": arith.ALPHABET} if config.tokenizer.kind == "char"
              else {"kind": config.tokenizer.kind, "path": config.tokenizer.path})
  model_io.save_model(storage.join(workdir, "model"), model.config, result.params,
                      tokenizer=tok_meta, notes={"task": config.data.get("task", ""),
                                                 "steps": result.step})
  if config.data.source == "arith":
    measure = measure_student if config.data.task == "student" else measure_generator
    report[config.data.task] = measure(result.params, model=model, tokenizer=tokenizer,
                                       ec=config.eval, mesh=mesh, rules=rules,
                                       shardings=result.param_shardings)
  storage.write_json(storage.join(workdir, "report.json"), report)
  return report
