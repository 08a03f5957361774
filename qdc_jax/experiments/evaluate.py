"""Evaluate a model: checkpoint x dataset x K samples -> JSON report + PNG pass@k curve.

Default: the shipped lab student on the lab's in-distribution and OOD test splits.
"""

from __future__ import annotations


import jax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from qdc_jax import config_lib  # pylint: disable=wrong-import-position
from qdc_jax import model_io  # pylint: disable=wrong-import-position
from qdc_jax import storage
from qdc_jax.data import arith, lab_tasks  # pylint: disable=wrong-import-position
from qdc_jax.eval import solve  # pylint: disable=wrong-import-position
from qdc_jax.models import transformer  # pylint: disable=wrong-import-position


def lab_splits(n: int) -> dict[str, tuple[list[str], list[int]]]:
  out = {}
  for split in ("in_dist", "ood"):
    problems = lab_tasks.test_problems(split, n)
    out[split] = ([arith.PROMPT_TEMPLATE.format(question=p.text) for p in problems],
                  [p.answer for p in problems])
  return out


def dataset_splits(dc) -> dict[str, tuple[list[str], list]]:
  if dc.name == "lab":
    return lab_splits(dc.size)
  from qdc_jax.data import math_tasks  # pylint: disable=g-import-not-at-top
  examples = math_tasks.load(dc.name, dc.path, flag="--config.data.path")[:dc.size or None]
  prompts = [dc.prompt_template.format(question=e.question) for e in examples]
  return {dc.name: (prompts, [e.answer for e in examples])}


def plot_pass_at_k(results: dict, path: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for split, m in results.items():
    ks = sorted(int(k.split("@")[1]) for k in m if k.startswith("pass@"))
    ax.plot(ks, [m[f"pass@{k}"] for k in ks], marker="o", label=split)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k (samples)")
  ax.set_ylabel("pass@k")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  config_lib.require(config, ["model_dir", "data.name", "sampling.k"])
  mesh, rules = config_lib.make_mesh(config.mesh)
  model_dir = config.model_dir or model_io.asset_path("lab_student")
  cfg, params, tokenizer, meta, shardings = model_io.load_model(model_dir, mesh=mesh,
                                                                rules=rules)
  if tokenizer is None:
    raise ValueError(f"{model_dir}/model.json names no tokenizer")
  model = transformer.Transformer(cfg)
  sc = config.sampling
  results, examples = {}, {}
  for split, (prompts, refs) in dataset_splits(config.data).items():
    m, outs = solve.solve_and_score(
        params, prompts, refs, model=model, tokenizer=tokenizer, k=sc.k,
        temperature=sc.temperature, max_new_tokens=sc.max_new_tokens, ks=tuple(sc.ks),
        rng=jax.random.PRNGKey(config.seed), batch_size=sc.batch_size, mesh=mesh,
        rules=rules, param_shardings=shardings,
        stop_strings=tuple(sc.get("stop_strings", ())))
    results[split] = m
    examples[split] = [{"prompt": p, "reference": r, "greedy": g, "samples": s[:4]}
                       for p, r, g, s in list(zip(prompts, refs, outs["greedy"],
                                                  outs["samples"]))[:8]]
    logging.info("%s: %s", split, {k: round(v, 4) for k, v in m.items()
                                   if k.startswith(("greedy", "pass@", "maj@"))})
  report = {"model_dir": model_dir, "model_notes": meta.get("notes", {}),
            "dataset": config.data.to_dict(), "sampling": sc.to_dict(), "results": results}
  storage.write_json(storage.join(workdir, "eval_report.json"), report)
  storage.write_json(storage.join(workdir, "eval_examples.json"), examples)
  plot_pass_at_k(results, storage.join(workdir, "pass_at_k.png"))
  return report
