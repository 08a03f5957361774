"""SPARQ report: report.md + report.json + PNGs in the workdir; strategy comparison plots.

  python -m qdc_jax.sparq.report --compare DIR_A DIR_B ... --out=compare.png

compares runs (e.g. the four strategies of launch/sparq_strategies.sh) on coverage vs problems
generated, QD-score and the distilled students' accuracies.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from qdc_jax.sparq import metrics as sparq_metrics  # pylint: disable=wrong-import-position
from qdc_jax.sparq.archive import Archive, ArchiveItem  # pylint: disable=wrong-import-position
from qdc_jax import storage


def coverage_curve(items: Sequence[ArchiveItem]) -> tuple[list[int], list[int]]:
  """(problems generated, unique non-empty skill-sets so far), children in id order."""
  seen, xs, ys = set(), [], []
  for n, it in enumerate(sorted((i for i in items if i.round > 0), key=lambda i: i.id), 1):
    if it.skill_set:
      seen.add(tuple(it.skill_set))
    xs.append(n)
    ys.append(len(seen))
  return xs, ys


def validity_by_solve_rate(items: Sequence[ArchiveItem], bins: int = 5) -> list[dict]:
  """Fraction of valid problems per solve-rate bin (thesis figure 4.10; exact on the lab)."""
  judged = [i for i in items if i.round > 0 and i.valid is not None and i.k > 0]
  edges = np.linspace(0, 1, bins + 1)
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = [i for i in judged if lo <= i.solve_rate < hi or (hi == 1 and i.solve_rate == 1)]
    out.append({"solve_rate_lo": float(lo), "solve_rate_hi": float(hi), "n": len(sel),
                "valid_fraction": (sum(bool(i.valid) for i in sel) / len(sel)) if sel
                else None})
  return out


def _save(fig, path):
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, items: Sequence[ArchiveItem], result: dict, config) -> None:
  """report.json, report.md and PNGs (call on every process: the writes are collective)."""
  children = [i for i in items if i.round > 0]
  summary = sparq_metrics.summarize(children)
  xs, ys = coverage_curve(items)
  validity = validity_by_solve_rate(items)
  doc = {"config": json.loads(config.to_json_best_effort()), "archive": summary,
         "validity_by_solve_rate": validity, **result}
  storage.write_json(storage.join(workdir, "report.json"), doc, default=str)

  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(xs, ys)
  ax.set_xlabel("problems generated")
  ax.set_ylabel("unique skill-sets (coverage)")
  ax.set_title(config.sparq.strategy)
  _save(fig, storage.join(workdir, "coverage.png"))

  fig, ax = plt.subplots(figsize=(5, 3.5))
  verified = [i for i in children if i.k > 0]
  ax.hist([i.quality for i in verified], bins=np.linspace(0, 1, 17), alpha=0.7,
          label="quality")
  ax.hist([i.solve_rate for i in verified], bins=np.linspace(0, 1, 17), alpha=0.5,
          label="solve rate")
  ax.set_xlabel("value")
  ax.set_ylabel("children")
  ax.legend()
  _save(fig, storage.join(workdir, "quality_hist.png"))

  if any(v["n"] for v in validity):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    mids = [(v["solve_rate_lo"] + v["solve_rate_hi"]) / 2 for v in validity if v["n"]]
    ax.bar(mids, [v["valid_fraction"] for v in validity if v["n"]], width=0.18)
    ax.set_xlabel("student solve rate")
    ax.set_ylabel("fraction valid (oracle)")
    ax.set_ylim(0, 1)
    _save(fig, storage.join(workdir, "validity_vs_solve_rate.png"))

  evals = {k: v for k, v in result.items() if k in ("baseline", "sparq")}
  if evals:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(evals)
    axes[0].bar(names, [evals[n].get("in_dist", {}).get("pass@1", 0) for n in names])
    axes[0].set_title("in-distribution pass@1")
    axes[0].set_ylim(0, 1)
    for n in names:
      ood = evals[n].get("ood", {})
      ks = sorted(int(k.split("@")[1]) for k in ood if k.startswith("pass@"))
      axes[1].plot(ks, [ood[f"pass@{k}"] for k in ks], marker="o", label=n)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("n")
    axes[1].set_title("OOD pass@n")
    axes[1].legend()
    _save(fig, storage.join(workdir, "eval.png"))

  lines = [f"# SPARQ report ({config.sparq.strategy})", "",
           f"{summary['problems']} problems generated in {config.sparq.rounds} rounds of "
           f"{config.sparq.parents_per_round} parents, K={config.sparq.k} verifications each.",
           "", "| metric | value |", "| --- | --- |"]
  for key in ("parse_failures", "valid_fraction", "mean_quality", "frac_quality_positive",
              "unique_skills", "unique_skill_sets", "qd_score"):
    val = summary.get(key)
    lines.append(f"| {key} | {val:.4g} |" if isinstance(val, float) else f"| {key} | {val} |")
  lines += ["", f"Training pairs after phase 2: {result.get('num_training_pairs', 0)}", ""]
  if evals:
    lines += ["| student | in-dist pass@1 | " + " | ".join(
        f"OOD pass@{k}" for k in sorted(int(k.split("@")[1]) for k in
                                         evals[names[0]].get("ood", {}) if
                                         k.startswith("pass@"))) + " |"]
    lines += ["| --- " * (2 + sum(k.startswith("pass@") for k in
                                   evals[names[0]].get("ood", {}))) + "|"]
    for n in names:
      ood = evals[n].get("ood", {})
      ks = sorted(int(k.split("@")[1]) for k in ood if k.startswith("pass@"))
      lines.append(f"| {n} | {evals[n].get('in_dist', {}).get('pass@1', float('nan')):.3f} | "
                   + " | ".join(f"{ood[f'pass@{k}']:.3f}" for k in ks) + " |")
  t = result.get("timing", {})
  if t.get("round_s"):
    lines += ["", f"Phase-1 time {t['round_s']:.0f} s: sampler "
              f"{(t['generator_s'] + t['student_s']) / t['round_s']:.0%}, host "
              f"{t['host_s'] / t['round_s']:.0%}."]
  lines += ["", "Plots: coverage.png, quality_hist.png, validity_vs_solve_rate.png, eval.png"]
  storage.write_text(storage.join(workdir, "report.md"), "\n".join(lines) + "\n")


def compare(workdirs: Sequence[str], out: str) -> dict[str, Any]:
  """Coverage curves and final numbers of several SPARQ runs in one PNG (+ returned dict)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  table = {}
  for d in workdirs:
    items = Archive(storage.join(d, "archive")).load_items()
    xs, ys = coverage_curve(items)
    name = storage.path(d).name
    ax.plot(xs, ys, label=name)
    rep = storage.read_json(storage.join(d, "report.json"), {})
    table[name] = {**sparq_metrics.summarize([i for i in items if i.round > 0]),
                   "sparq": rep.get("sparq"), "baseline": rep.get("baseline")}
  ax.set_xlabel("problems generated")
  ax.set_ylabel("unique skill-sets")
  ax.legend()
  _save(fig, out)
  return table


if __name__ == "__main__":
  args = sys.argv[1:]
  if not args or args[0] != "--compare":
    sys.exit("usage: python -m qdc_jax.sparq.report --compare DIR... [--out=compare.png]")
  outs = [a for a in args[1:] if a.startswith("--out=")]
  dirs = [a for a in args[1:] if not a.startswith("--out=")]
  print(json.dumps(compare(dirs, outs[0][6:] if outs else "compare.png"), indent=2,
                   default=str))
