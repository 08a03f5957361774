"""Fits, tables and plots of the scaling workload (`experiments/scaling.py`): report.md,
report.json and PNGs in its workdir.

A finished run's results read back with `load(workdir)`; `fits`, `plots`,
`exponents_markdown`, `manifold_markdown` and `table_2_1_markdown` then work on them as on a
live run (colabs/scaling_laws.ipynb does this with the committed docs/results/scaling_full).
"""

from __future__ import annotations

import math

import numpy as np

from qdc_jax import storage
from qdc_jax.scaling import laws


def _fit_or_none(sizes, losses) -> dict:
  try:
    f = laws.fit_power_law(sizes, losses)
  except ValueError as e:  # e.g. a non-positive loss
    return {"error": str(e)}
  return {"alpha": f.alpha, "stderr": f.stderr, "log_a": f.log_a, "points": f.points}


def fits(results: dict) -> dict:
  """alpha_D_hat per corpus vs 2/(2+d); alpha_N_hat over widths vs 2/d; the manifold's
  alpha_D_hat per true d vs 2/(2+d)."""
  out: dict = {"data": {}, "width": None, "manifold": {}}
  for name, c in results["corpora"].items():
    runs = c["runs"]
    f = _fit_or_none([r["tokens"] for r in runs], [r["test_loss"] for r in runs])
    d = runs[-1]["id"]["final"]["id"]
    pred = laws.alpha_d_from_id(d)
    f.update(id=d, id_interval=runs[-1]["id"]["final"]["interval"], predicted=pred,
             difference=(f["alpha"] - pred) if "alpha" in f else None)
    out["data"][name] = f
  if results["widths"]:
    w = results["widths"]
    f = _fit_or_none([r["non_embedding_params"] for r in w], [r["test_loss"] for r in w])
    corpus = w[0]["corpus"]
    d = results["corpora"][corpus]["runs"][-1]["id"]["final"]["id"]
    pred = laws.alpha_n_from_id(d)
    f.update(corpus=corpus, id=d, predicted=pred,
             difference=(f["alpha"] - pred) if "alpha" in f else None)
    if "alpha" in f:
      f["alpha_d_from_alpha_n"] = laws.alpha_d_from_alpha_n(f["alpha"])
      f["alpha_d_measured"] = out["data"][corpus].get("alpha")
    out["width"] = f
  ids = {r["true_dim"]: r for r in results.get("manifold_id", [])}
  for dim in sorted({r["dim"] for r in results["manifold"]}):
    runs = [r for r in results["manifold"] if r["dim"] == dim]
    f = _fit_or_none([r["points"] for r in runs], [r["test_mse_over_var"] for r in runs])
    pred = laws.alpha_d_from_id(dim)
    f.update(predicted=pred, difference=(f["alpha"] - pred) if "alpha" in f else None,
             estimated_id=ids.get(dim, {}).get("mle_mean"))
    out["manifold"][str(dim)] = f
  return out


def _fmt(x, nd=3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return "nan" if math.isnan(x) else f"{x:.{nd}f}"
  return str(x)


def _slope_lines(ax, sizes, f, predicted, color):
  xs = np.geomspace(min(sizes), max(sizes), 50)
  if "alpha" not in f:
    return
  ax.plot(xs, np.exp(f["log_a"]) * xs ** -f["alpha"], "-", color=color,
          label=f"fit alpha={f['alpha']:.3f}+-{f['stderr']:.3f}")
  mid = math.sqrt(min(sizes) * max(sizes))
  at = np.exp(f["log_a"]) * mid ** -f["alpha"]
  ax.plot(xs, at * (xs / mid) ** -predicted, "--", color=color,
          label=f"predicted {predicted:.3f}")


def _save(fig, workdir: str, name: str, made: list) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  storage.save_figure(fig, storage.join(workdir, name))
  made.append(name)
  plt.close(fig)


def plots(workdir: str, results: dict, fit: dict) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  made = []
  names = list(results["corpora"])
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    runs = results["corpora"][name]["runs"]
    n = [r["tokens"] for r in runs]
    ax.loglog(n, [r["test_loss"] for r in runs], "o", color="C0")
    _slope_lines(ax, n, fit["data"][name], fit["data"][name]["predicted"], "C0")
    ax.set(title=f"{name} (ID {fit['data'][name]['id']:.1f})", xlabel="training tokens n",
           ylabel="test loss (nats/byte)")
    ax.legend(fontsize=7)
  _save(fig, workdir, "loss_vs_data.png", made)

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for i, name in enumerate(names):
    ident = results["corpora"][name]["runs"][-1]["id"]
    layers = sorted(int(k) for k in ident["layers"])
    xs = layers + [len(layers)]
    ys = [ident["layers"][str(l)]["id"] for l in layers] + [ident["final"]["id"]]
    axes[0].plot(xs, ys, "o-", color=f"C{i}", label=name)
    pos = ident["positions"]
    axes[1].plot([(p["lo"] + p["hi"]) / 2 for p in pos], [p["id"] for p in pos], "o-",
                 color=f"C{i}", label=name)
  axes[0].set(xlabel="layer (last = final, after the final norm)", ylabel="intrinsic dim (MLE)",
              title="ID vs layer")
  axes[1].set(xlabel="context position (bucket centre)", ylabel="intrinsic dim (MLE)",
              title="ID vs context position")
  if results["widths"]:
    w = results["widths"]
    axes[2].plot([r["d_model"] for r in w], [r["id"]["final"]["id"] for r in w], "o-")
    axes[2].set(xscale="log", xlabel="model width d_model", ylabel="intrinsic dim (MLE)",
                title=f"ID vs width ({w[0]['corpus']})")
  for ax in axes[:2]:
    ax.legend(fontsize=7)
  _save(fig, workdir, "id_ablations.png", made)

  if results["widths"]:
    w = results["widths"]
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    p = [r["non_embedding_params"] for r in w]
    ax.loglog(p, [r["test_loss"] for r in w], "o", color="C1")
    _slope_lines(ax, p, fit["width"], fit["width"]["predicted"], "C1")
    ax.set(xlabel="non-embedding parameters N", ylabel="test loss (nats/byte)",
           title=f"L(N), {w[0]['corpus']}")
    ax.legend(fontsize=7)
    _save(fig, workdir, "loss_vs_params.png", made)

  if results["manifold"]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, dim in enumerate(sorted(fit["manifold"], key=int)):
      runs = [r for r in results["manifold"] if r["dim"] == int(dim)]
      n = [r["points"] for r in runs]
      axes[0].loglog(n, [r["test_mse_over_var"] for r in runs], "o", color=f"C{i}")
      _slope_lines(axes[0], n, fit["manifold"][dim], fit["manifold"][dim]["predicted"],
                   f"C{i}")
    axes[0].set(xlabel="training points n", ylabel="test MSE / Var(y)",
                title="manifold regression (d = 2, 4, ...: colours)")
    axes[0].legend(fontsize=6)
    mid = results.get("manifold_id", [])
    if mid:
      t = [r["true_dim"] for r in mid]
      axes[1].plot(t, t, "k:", label="truth")
      for key in ("mle_mean", "twonn"):
        axes[1].plot(t, [r[key] for r in mid], "o-", label=key)
      axes[1].set(xlabel="true d", ylabel="estimated ID", title="ID of the manifold points")
      axes[1].legend(fontsize=7)
    _save(fig, workdir, "manifold.png", made)
  return made


def load(workdir: str) -> dict:
  """The results of a finished scaling run (its workdir's report.json, or that file's path):
  the committed lab results are docs/results/scaling/ and docs/results/scaling_full/. Its
  "fits" can be recomputed with `fits(results)`, plotted with `plots`, tabled with
  `exponents_markdown` / `manifold_markdown`."""
  path = workdir if workdir.endswith(".json") else storage.join(workdir, "report.json")
  results = storage.read_json(path)
  if results is None:
    raise FileNotFoundError(f"{path} does not exist: not a finished scaling workdir (the "
                            f"report is written when every unit has finished)")
  return results


def exponents_markdown(results: dict, fit: dict) -> str:
  """The data-size exponents per corpus beside their ID predictions, every run's losses, and
  the model-size exponent (thesis figures 2.2 and 2.3), as markdown."""
  lines = ["## Data-size exponents (figure 2.2)", "",
           "| corpus | alpha_D_hat (+- s.e.) | ID d (MLE, 95% interval) | predicted 2/(2+d) | "
           "difference |", "|---|---|---|---|---|"]
  for name, f in fit["data"].items():
    lo, hi = f["id_interval"]
    lines.append(f"| {name} | {_fmt(f.get('alpha'))} +- {_fmt(f.get('stderr'))} | "
                 f"{f['id']:.2f} ({lo:.2f}-{hi:.2f}) | {f['predicted']:.3f} | "
                 f"{_fmt(f['difference'])} |")
  lines += ["", "| corpus | n (tokens) | test loss | valid loss | best step | steps run |",
            "|---|---|---|---|---|---|"]
  for name, c in results["corpora"].items():
    for r in c["runs"]:
      lines.append(f"| {name} | {r['tokens']} | {r['test_loss']:.4f} | {r['valid_loss']:.4f}"
                   f" | {r['best_step']} | {r['steps_run']} |")
  if fit["width"]:
    f = fit["width"]
    lines += ["", f"## Model-size exponent (figure 2.3), {f['corpus']}", "",
              f"alpha_N_hat = {_fmt(f.get('alpha'))} +- {_fmt(f.get('stderr'))} over "
              f"{len(results['widths'])} widths; predicted 2/d = {f['predicted']:.3f} (d = "
              f"{f['id']:.2f}); difference {_fmt(f['difference'])}. ID-free: alpha_N_hat / "
              f"(alpha_N_hat + 1) = {_fmt(f.get('alpha_d_from_alpha_n'))} vs the measured "
              f"alpha_D_hat {_fmt(f.get('alpha_d_measured'))}.", "",
              "| d_model | non-embedding params | test loss | ID (final layer) |",
              "|---|---|---|---|"]
    for r in results["widths"]:
      lines.append(f"| {r['d_model']} | {r['non_embedding_params']} | {r['test_loss']:.4f} | "
                   f"{r['id']['final']['id']:.2f} |")
  return "\n".join(lines) + "\n"


def manifold_markdown(fit: dict) -> str:
  """The manifold check (thesis 2.3): per true dimension d the estimated ID and the fitted
  data exponent beside 2/(2+d); '' when the run had no manifold grid."""
  if not fit["manifold"]:
    return ""
  lines = ["## The manifold check (thesis 2.3)", "",
           "| true d | estimated ID (MLE) | alpha_D_hat (+- s.e.) | predicted 2/(2+d) | "
           "difference |", "|---|---|---|---|---|"]
  for dim, f in sorted(fit["manifold"].items(), key=lambda kv: int(kv[0])):
    lines.append(f"| {dim} | {_fmt(f['estimated_id'], 2)} | {_fmt(f.get('alpha'))} +- "
                 f"{_fmt(f.get('stderr'))} | {f['predicted']:.3f} | "
                 f"{_fmt(f['difference'])} |")
  return "\n".join(lines) + "\n"


def table_2_1_markdown(rows: list[dict]) -> str:
  """Table 2.1 (`laws.table_2_1()`): each cell recomputed beside the printed value."""
  lines = ["## Table 2.1, recomputed from the published exponents", "",
           "| model | cell | recomputed | printed | printed follows |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['cell']} | {r['computed']:.4f} | {r['printed_text']} | "
                 f"{'yes' if r['printed_follows'] else '**no**'} |")
  return "\n".join(lines) + "\n"


def markdown(results: dict, fit: dict, config) -> str:
  lines = ["# Scaling laws from the intrinsic dimension of data", "",
           f"Config: `{config.get('preset', '')}` preset; model `{config.model.name}` "
           f"(d_model {results['corpora'][next(iter(results['corpora']))]['runs'][0]['d_model']}"
           f"), byte-level tokens, seq_len {config.train.seq_len}, batch "
           f"{config.train.batch_size}; early stopping every {config.train.eval_every} steps, "
           f"patience {config.train.patience}; one seed ({config.train.seed}). "
           f"Run time {results.get('seconds', 0) / 60:.1f} min.", "",
           exponents_markdown(results, fit).rstrip("\n")]
  lines += ["", "## Intrinsic dimension ablations (figure 2.4)", "",
            "| corpus | layer: ID | position bucket: ID |", "|---|---|---|"]
  for name, c in results["corpora"].items():
    ident = c["runs"][-1]["id"]
    ls = ", ".join(f"{k}: {v['id']:.2f}" for k, v in sorted(ident["layers"].items(),
                                                             key=lambda kv: int(kv[0])))
    ps = ", ".join(f"{p['lo']}-{p['hi']}: {p['id']:.2f}" for p in ident["positions"])
    lines.append(f"| {name} | {ls}, final: {ident['final']['id']:.2f} | {ps} |")
  if fit["manifold"]:
    lines += ["", manifold_markdown(fit).rstrip("\n")]
  lines += ["", table_2_1_markdown(results["table_2_1"]).rstrip("\n")]
  lines += ["", "## Corpora", ""]
  for name, c in results["corpora"].items():
    lines.append(f"- **{name}**: {c['provenance']}")
  lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in results.get("plots", []))]
  return "\n".join(lines) + "\n"


def write(workdir: str, results: dict, config) -> None:
  fit = results["fits"]
  results["plots"] = plots(workdir, results, fit)
  storage.write_text(storage.join(workdir, "report.md"), markdown(results, fit, config))
  storage.write_json(storage.join(workdir, "report.json"), results, default=str)
