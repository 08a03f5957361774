r"""Tables and plots in the form of the thesis's RL results from rl_report.json files.

  python -m qdc_jax.rl.report --out=docs/results \
      --run="SFT=/tmp/sft_lab" --run="EI=/tmp/ei_lab" --run="Sparse PPO=/tmp/ppo_lab" ...

Writes <out>/rl_tables.md (one table per test split with maj@1, maj@k, pass@k and the
rollouts used: thesis tables 3.4-3.6), sample_complexity.png (validation maj@1 / pass@k vs
rollouts, log-x: figures 3.8, 3.12, 3.13), ei_iterations.png (EI accuracy per round: figure
3.9) and diversity.png (exact and trace diversity over all and over correct samples: figure
3.16), and rl_runs.json (every run's report, read back by `load_results`).
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from qdc_jax.rl import common
from qdc_jax import storage

_RUN = flags.DEFINE_multi_string("run", [], "NAME=WORKDIR of an RL run (rl_report.json)")
_OUT = flags.DEFINE_string("out", "docs/results", "output directory")


def load_runs(specs: Sequence[str]) -> list[tuple[str, dict]]:
  runs = []
  for spec in specs:
    if "=" not in spec:
      raise ValueError(f"--run={spec!r}: write NAME=WORKDIR")
    name, workdir = spec.split("=", 1)
    path = storage.join(workdir, common.REPORT_FILE)
    report = storage.read_json(path)
    if report is None:
      raise FileNotFoundError(f"{path} does not exist: did the run finish?")
    runs.append((name, report))
  return runs


def load_results(path: str) -> list[tuple[str, dict]]:
  """The runs of an rl_runs.json that this command wrote (a file, or the --out directory
  holding it; the committed lab results are docs/results/rl_runs.json), in their order and
  in `load_runs`' form: the tables and plots redrawn without the runs' workdirs."""
  if not path.endswith(".json"):
    path = storage.join(path, "rl_runs.json")
  runs = storage.read_json(path)
  if runs is None:
    raise FileNotFoundError(f"{path} does not exist (python -m qdc_jax.rl.report --out=DIR "
                            f"writes DIR/rl_runs.json)")
  return list(runs.items())


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def tables(runs: list[tuple[str, dict]]) -> str:
  splits = []
  for _, r in runs:
    splits += [s for s in r.get("final", {}) if s not in splits]
  out = []
  for split in splits:
    ks = sorted({r["k"] for _, r in runs})
    # Runs sampled with different K: the columns hold each run's own K, named in its row.
    k = ks[-1] if len(ks) == 1 else "k"
    out.append(f"### Test split `{split}`\n")
    out.append(f"| model | maj@1 | maj@{k} | pass@{k} | exact div. | trace div. | "
               f"trace div. (correct) | rollouts spent | model chosen at |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for name, r in runs:
      m = r.get("final", {}).get(split)
      if m is None:
        continue
      spent = max((p["rollouts"] for p in r.get("curve", [])), default=0)
      best = r.get("best")
      if best is None and r.get("notes", {}).get("best_round") is not None:
        best = next((p for p in r["curve"] if p["round"] == r["notes"]["best_round"]), None)
      chosen = f"{best['rollouts']:,}" if best else "-"
      rk = r["k"]
      label = name if len(ks) == 1 else f"{name} (k={rk})"
      out.append(f"| {label} | {_fmt(m.get('maj@1'))} | {_fmt(m.get(f'maj@{rk}'))} | "
                 f"{_fmt(m.get(f'pass@{rk}'))} | {_fmt(m.get('diversity/exact_all'))} | "
                 f"{_fmt(m.get('diversity/trace_all'))} | "
                 f"{_fmt(m.get('diversity/trace_correct'))} | {spent:,} | {chosen} |")
    out.append("")
  return "\n".join(out)


def plots(runs: list[tuple[str, dict]], out_dir: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  k = max(r["k"] for _, r in runs)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, r in runs:
    curve = r.get("curve", [])
    if len(curve) < 2:
      continue
    xs = [max(p["rollouts"], 1) for p in curve]
    axes[0].plot(xs, [p["maj@1"] for p in curve], marker="o", label=name)
    rk = r["k"]
    axes[1].plot(xs, [p.get(f"pass@{rk}") for p in curve], marker="o", label=name)
  for ax, title in zip(axes, ("validation maj@1", f"validation pass@{k}")):
    ax.set_xscale("log")
    ax.set_xlabel("rollouts sampled (1 = the initial policy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path = storage.join(out_dir, "sample_complexity.png")
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)
  written.append(path)

  ei = [(n, r) for n, r in runs if r.get("algorithm") == "ei"]
  if ei:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, r in ei:
      rounds = [p["round"] for p in r["curve"]]
      rk = r["k"]
      for key, style in (("maj@1", "-o"), (f"maj@{rk}", "--s"), (f"pass@{rk}", ":^")):
        ax.plot(rounds, [p.get(key) for p in r["curve"]], style, label=f"{name} {key}")
    ax.set_xlabel("EI round (0 = initial policy)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = storage.join(out_dir, "ei_iterations.png")
    storage.save_figure(fig, path, dpi=120)
    plt.close(fig)
    written.append(path)

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  names = [n for n, _ in runs]
  width = 0.2
  for ax, subset in zip(axes, ("all", "correct")):
    for j, kind in enumerate(("exact", "trace")):
      vals = []
      for _, r in runs:
        last = r["curve"][-1] if r.get("curve") else {}  # the policy at the end of the run
        vals.append(last.get(f"diversity/{kind}_{subset}") or 0.0)
      xs = [i + (j - 0.5) * width for i in range(len(runs))]
      ax.bar(xs, vals, width, label=f"{kind}")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"distinct solutions / question ({subset} samples; val, end of run)",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
  fig.tight_layout()
  path = storage.join(out_dir, "diversity.png")
  storage.save_figure(fig, path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written


def main(argv):
  del argv
  runs = load_runs(_RUN.value)
  if not runs:
    raise app.UsageError("give at least one --run=NAME=WORKDIR")
  storage.makedirs(_OUT.value)
  storage.write_text(storage.join(_OUT.value, "rl_tables.md"), tables(runs))
  for path in plots(runs, _OUT.value):
    print("wrote", path)
  storage.write_json(storage.join(_OUT.value, "rl_runs.json"), {n: r for n, r in runs},
                     indent=1)
  print(tables(runs))


if __name__ == "__main__":
  app.run(main)
