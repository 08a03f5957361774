"""SPARQ report: report.md + report.json + PNGs in the workdir; strategy comparison plots.

  python -m qdc_jax.sparq.report --compare DIR_A DIR_B ... --out=compare.png

compares runs (e.g. the four strategies of launch/sparq_strategies.sh) on coverage vs problems
generated, QD-score and the distilled students' accuracies.

The pieces work on any finished (or interrupted) run's workdir too: `load_run(workdir)` gives
its archive items and report.json; `plot_rounds(metrics.by_round(items), path)` plots coverage
and QD-score over rounds; `plot_niches` / `niches_markdown(metrics.niches(...))` show the
niches (skill-sets) with their best problems (colabs/sparq_explorer.ipynb uses them).
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


def load_run(workdir: str) -> tuple[list[ArchiveItem], dict[str, Any]]:
  """(archive items in id order, report.json) of a SPARQ workdir; the report is {} while the
  run has not finished. The archive is opened read-only: a run still writing it is left
  alone, and only its committed rounds are read.

  Raises:
    FileNotFoundError: the workdir has no committed round (not a SPARQ workdir, or empty).
  """
  directory = storage.join(workdir, "archive")
  archive = Archive(directory, read_only=True) if storage.exists(directory) else None
  if archive is None or not archive.rounds_committed():
    raise FileNotFoundError(f"{workdir} holds no SPARQ archive with a committed round "
                            f"(expected {directory}/round_000000.json)")
  return archive.load_items(), storage.read_json(storage.join(workdir, "report.json"), {})


def plot_rounds(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """Coverage (unique skill-sets, all and with quality > 0) and QD-score of the archive after
  each round, plus each round's own QD-score; `rows` as `metrics.by_round` returns them."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  rounds = [r["round"] for r in rows]
  axes[0].plot(rounds, [r["archive/unique_skill_sets"] for r in rows], "o-", label="all")
  axes[0].plot(rounds, [r["archive/unique_skill_sets_positive"] for r in rows], "s--",
               label="quality > 0")
  axes[0].set_ylabel("unique skill-sets (coverage)")
  axes[0].legend()
  axes[1].plot(rounds, [r["archive/qd_score"] for r in rows], "o-", label="archive")
  axes[1].bar(rounds, [r["round/qd_score"] for r in rows], alpha=0.4, label="round alone")
  axes[1].set_ylabel("QD-score")
  axes[1].legend()
  for ax in axes:
    ax.set_xlabel("round")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  _save(fig, path)


def _niche_name(n: sparq_metrics.Niche) -> str:
  return " + ".join(n.skill_set)


def plot_niches(niches: Sequence[sparq_metrics.Niche], path: str, top: int = 20) -> None:
  """The QD picture of an archive: best quality per niche (the bars sum to the QD-score),
  mean quality as a dot, the first `top` niches of `metrics.niches` order."""
  shown = list(niches)[:top]
  fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * max(len(shown), 1)))
  ys = np.arange(len(shown))[::-1]
  ax.barh(ys, [n.best_quality for n in shown], color="C0", label="best quality")
  ax.plot([n.mean_quality for n in shown], ys, "o", color="C1", label="mean quality")
  ax.set_yticks(ys)
  ax.set_yticklabels([f"{_niche_name(n)} ({n.count})" for n in shown], fontsize=7)
  ax.set_xlim(0, 1)
  ax.set_xlabel("quality")
  more = len(niches) - len(shown)
  ax.set_title(f"{len(niches)} niches (skill-sets; problems in brackets)"
               + (f", first {len(shown)} shown" if more > 0 else ""), fontsize=9)
  if not shown:
    ax.text(0.5, 0.5, "no problem with a non-empty skill-set", ha="center", va="center",
            transform=ax.transAxes)
  else:
    ax.legend(fontsize=7, loc="lower right")
  _save(fig, path)


def _cell(text: str, limit: int = 120) -> str:
  text = " ".join(str(text).split()).replace("|", "\\|")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def niches_markdown(niches: Sequence[sparq_metrics.Niche], top: int = 10,
                    per_niche: int = 2) -> str:
  """A markdown table of the first `top` niches with up to `per_niche` example problems each
  (question, the generator's intended answer, the oracle's verdict on it where there is one
  (the lab), quality, the student's solve rate, strategy and round)."""
  lines = ["| niche (skill-set) | problems | best quality | mean quality | example | answer | "
           "valid | quality | solve rate | from |", "|---|---|---|---|---|---|---|---|---|---|"]
  for n in list(niches)[:top]:
    for j, it in enumerate(n.examples[:max(per_niche, 1)]):
      head = (f"{_cell(_niche_name(n))} | {n.count} | {n.best_quality:.3f} | "
              f"{n.mean_quality:.3f}") if j == 0 else " |  |  | "
      question = it.question if it.question is not None else f"(unreadable: {it.parse_error})"
      valid = "-" if it.valid is None else ("yes" if it.valid else "no")
      lines.append(f"| {head} | {_cell(question)} | {_cell(it.intended_answer or '-', 20)} | "
                   f"{valid} | {it.quality:.3f} | {it.num_correct}/{it.k} | {it.strategy}, round "
                   f"{it.round} |")
  if len(niches) > top:
    lines.append(f"\n... and {len(niches) - top} more niches.")
  if not niches:
    lines.append("| (none: no problem with a non-empty skill-set) |" + "  |" * 9)
  return "\n".join(lines) + "\n"


def write_report(workdir: str, items: Sequence[ArchiveItem], result: dict, config) -> None:
  """report.json, report.md and PNGs (call on every process: the writes are collective)."""
  children = sparq_metrics.children(items)
  summary = sparq_metrics.summarize(children)
  xs, ys = coverage_curve(items)
  validity = validity_by_solve_rate(items)
  rounds = sparq_metrics.by_round(items)
  niches = sparq_metrics.niches(children)
  doc = {"config": json.loads(config.to_json_best_effort()), "archive": summary,
         "validity_by_solve_rate": validity, "by_round": rounds, **result}
  storage.write_json(storage.join(workdir, "report.json"), doc, default=str)

  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(xs, ys)
  ax.set_xlabel("problems generated")
  ax.set_ylabel("unique skill-sets (coverage)")
  ax.set_title(config.sparq.strategy)
  _save(fig, storage.join(workdir, "coverage.png"))
  if rounds:
    plot_rounds(rounds, storage.join(workdir, "rounds.png"), title=config.sparq.strategy)
  plot_niches(niches, storage.join(workdir, "niches.png"))

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
  lines += ["", "## Examples per niche", "", niches_markdown(niches)]
  lines += ["Plots: coverage.png, rounds.png, niches.png, quality_hist.png, "
            "validity_vs_solve_rate.png, eval.png"]
  storage.write_text(storage.join(workdir, "report.md"), "\n".join(lines) + "\n")


def compare(workdirs: Sequence[str], out: str) -> dict[str, Any]:
  """Coverage curves and final numbers of several SPARQ runs in one PNG (+ returned dict)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  table = {}
  for d in workdirs:
    items, rep = load_run(d)
    xs, ys = coverage_curve(items)
    name = storage.path(d).name
    ax.plot(xs, ys, label=name)
    table[name] = {**sparq_metrics.summarize(sparq_metrics.children(items)),
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
