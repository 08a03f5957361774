"""report.md, report.json and PNGs of the QDC measures of several datasets, side by side."""

from __future__ import annotations

from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from qdc_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from qdc_jax.qdc import profile as profile_lib  # pylint: disable=wrong-import-position

# (section, measure, label) in the table's order; rows no dataset has are left out.
TABLE = (
    ("quality", "correct", "solution reaches the answer"),
    ("quality", "lab_valid", "lab oracle: answer is the true value"),
    ("quality", "student_solve_rate", "student solve rate"),
    ("quality", "sparq_quality", "SPARQ QUALITY (student)"),
    ("quality", "sparq_quality_positive", "share with QUALITY > 0"),
    ("quality", "orm_score", "ORM score"),
    ("quality", "recorded_quality", "recorded QUALITY"),
    ("quality", "recorded_solve_rate", "recorded solve rate"),
    ("diversity", "skill_coverage", "skill coverage (unique skill-sets of <= k skills)"),
    ("diversity", "skill_coverage_all", "skill coverage, all skills (unique sets)"),
    ("diversity", "skill_div", "DIV (unique skills)"),
    ("diversity", "distinct_1", "distinct-1 (questions)"),
    ("diversity", "distinct_2", "distinct-2"),
    ("diversity", "distinct_3", "distinct-3"),
    ("diversity", "distinct_4", "distinct-4"),
    ("diversity", "self_bleu", "self-BLEU-4 (lower = more diverse)"),
    ("diversity", "embedding_dispersion", "embedding dispersion (mean cosine distance)"),
    ("diversity", "vendi", "Vendi score (cosine kernel)"),
    ("diversity", "nn_distance", "nearest-neighbour cosine distance"),
    ("diversity", "unique_questions", "unique questions / rows"),
    ("diversity", "solutions_exact_diversity", "distinct solutions / solutions"),
    ("diversity", "solutions_trace_diversity", "distinct operation traces / solutions"),
    ("complexity", "steps", "reasoning steps (operations in the solution)"),
    ("complexity", "num_skills", "skills per problem"),
    ("complexity", "question_words", "question length (words)"),
    ("complexity", "solution_words", "solution length (words)"),
    ("complexity", "lab_ops", "lab operations"),
    ("complexity", "lab_max_digits", "lab digits of the largest literal"),
    ("size", "rows", "rows"),
    ("size", "lab_parse_rate", "questions in the lab language"),
)
# Quality and diversity axes of the QD scatter: the first measure every dataset has.
QUALITY_AXIS = ("sparq_quality", "student_solve_rate", "lab_valid", "correct",
                "recorded_quality", "orm_score")
DIVERSITY_AXIS = ("embedding_dispersion", "vendi", "distinct_2", "skill_coverage")


def _cell(profile: dict, key: str) -> str:
  v = profile["measures"].get(key)
  if v is None:
    return "-"
  if isinstance(v, int):
    return str(v)
  s = profile["summaries"].get(key)
  if s and s.get("n", 0) > 1 and s.get("ci95"):
    return f"{v:.3f} ± {_half_width(profile, key):.3f}"
  return f"{v:.3f}"


def markdown(profiles: dict, datasets_info: dict, settings: dict) -> str:
  names = list(profiles)
  lines = ["# QDC measures", "",
           "Side by side, one column per dataset. `a ± b`: mean over rows and the half-width "
           "of its 95% interval (normal approximation). Definitions: `qdc_jax/qdc/profile.py`, "
           "`qdc_jax/qdc/measures.py`.", ""]
  lines += ["| dataset | kind | path |", "| --- | --- | --- |"]
  lines += [f"| {n} | {datasets_info[n]['kind']} | `{datasets_info[n]['path']}` |"
            for n in names]
  lines += ["", "| measure | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names)]
  section = None
  for sec, key, label in TABLE:
    if all(profiles[n]["measures"].get(key) is None for n in names):
      continue
    if sec != section:
      lines.append(f"| **{sec}** |" + " |" * len(names))
      section = sec
    lines.append(f"| {label} | " + " | ".join(_cell(profiles[n], key) for n in names) + " |")
  down = {n: datasets_info[n].get("downstream") for n in names}
  if any(down.values()):
    lines += ["", "Downstream: the student distilled on each SPARQ workdir's phase-2 set "
              "(`report.json` of the workdir; one seed), and the student before:", "",
              "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    keys = sorted({k for d in down.values() if d for m in ("baseline", "sparq")
                   for k in d[m] if "pass@" in k})
    for key in ("strategy", "filter"):
      lines.append(f"| {key} | " + " | ".join(str(down[n][key]) if down[n] else "-"
                                               for n in names) + " |")
    for model in ("sparq", "baseline"):
      for key in keys:
        lines.append(f"| {model} {key} | " + " | ".join(
            f"{down[n][model][key]:.3f}" if down[n] and down[n][model].get(key) is not None
            else "-" for n in names) + " |")
  mixes = {n: profiles[n]["measures"].get("lab_op_mix") for n in names}
  if any(mixes.values()):
    ops = sorted({op for m in mixes.values() if m for op in m})
    lines += ["", "Lab operation mix (share of all operations):", "",
              "| op | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for op in ops:
      lines.append(f"| `{op}` | " + " | ".join(
          f"{mixes[n].get(op, 0):.3f}" if mixes[n] else "-" for n in names) + " |")
  lines += ["", "Notes:", ""]
  for n in names:
    for note in profiles[n]["notes"]:
      lines.append(f"- {n}: {note}")
  emb = settings.get("embed", {})
  if emb.get("model_dir") == "none":
    lines.append("- no embedding measures (--config.embed.model_dir=none)")
  else:
    lines.append(f"- embeddings: {emb.get('model_dir') or 'the shipped lab student'}, layer "
                 f"{emb.get('layer')} (-1 = final, after the final norm), mean-pooled over "
                 f"the {emb.get('field')} tokens (BOS left out; at most "
                 f"{emb.get('max_tokens') or 'max_len'})")
  lines += ["", "Figures: histograms.png, qd_scatter.png" +
            (", coverage.png" if any(i.get("coverage") for i in datasets_info.values())
             else ""), ""]
  return "\n".join(lines)


def _half_width(profile: dict, key: str) -> Optional[float]:
  s = profile["summaries"].get(key)
  return (s["ci95"][1] - s["ci95"][0]) / 2 if s and s.get("ci95") else None


def _first_shared(profiles: dict, keys) -> Optional[str]:
  for k in keys:
    if all(p["measures"].get(k) is not None for p in profiles.values()):
      return k
  return None


def plots(workdir: str, profiles: dict, datasets_info: dict) -> list[str]:
  made = []
  names = list(profiles)
  keys = [k for k in profile_lib.ROW_MEASURES
          if any(k in profiles[n]["summaries"] for n in names)]
  if keys:
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
      vals = {n: np.asarray([v for v in profiles[n]["rows"].get(key, []) if v is not None],
                            np.float64) for n in names}
      allv = np.concatenate([v for v in vals.values() if len(v)])
      lo, hi = float(allv.min()), float(allv.max())
      integer = np.allclose(allv, np.round(allv)) and hi - lo <= 40
      bins = (np.arange(lo - 0.5, hi + 1.5) if integer else
              np.linspace(lo, hi if hi > lo else lo + 1, 21))
      for n in names:
        if len(vals[n]):
          ax.hist(vals[n], bins=bins, histtype="step", density=True, label=n, lw=1.4)
      ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
      ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    storage.save_figure(fig, storage.join(workdir, "histograms.png"))
    plt.close(fig)
    made.append("histograms.png")
  qk, dk = _first_shared(profiles, QUALITY_AXIS), _first_shared(profiles, DIVERSITY_AXIS)
  if qk and dk:
    fig, ax = plt.subplots(figsize=(5, 4))
    for n in names:
      x, y = profiles[n]["measures"][dk], profiles[n]["measures"][qk]
      err = [_half_width(profiles[n], k) for k in (dk, qk)]
      ax.errorbar([x], [y], xerr=err[0], yerr=err[1], fmt="o", ms=6, capsize=3)
      ax.annotate(n, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.margins(0.25)
    ax.set_xlabel(f"diversity: {dk}")
    ax.set_ylabel(f"quality: {qk}")
    ax.set_title("quality vs diversity (one point per dataset; bars: 95% intervals)",
                 fontsize=9)
    fig.tight_layout()
    storage.save_figure(fig, storage.join(workdir, "qd_scatter.png"))
    plt.close(fig)
    made.append("qd_scatter.png")
  covs = {n: i["coverage"] for n, i in datasets_info.items() if i.get("coverage")}
  if covs:
    fig, ax = plt.subplots(figsize=(5, 4))
    for n, c in covs.items():
      ax.plot([r[2] for r in c], [r[1] for r in c], marker=".", label=n)
    ax.set_xlabel("rows, cumulative over the rounds that generated them")
    ax.set_ylabel("unique skill-sets (coverage)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    storage.save_figure(fig, storage.join(workdir, "coverage.png"))
    plt.close(fig)
    made.append("coverage.png")
  return made


def write(workdir: str, profiles: dict, datasets_info: dict, settings: dict) -> dict:
  """report.md and the PNGs; returns the report.json value (every measure, summary and note;
  no per-row lists), which the caller writes last: it marks the run finished."""
  made = plots(workdir, profiles, datasets_info)
  report = {"datasets": {n: {**datasets_info[n], "n": p["n"], "measures": p["measures"],
                             "summaries": p["summaries"], "notes": p["notes"]}
                         for n, p in profiles.items()},
            "figures": made}
  storage.write_text(storage.join(workdir, "report.md"),
                     markdown(profiles, datasets_info, settings))
  return report
