"""Any synthetic (or real) math dataset as rows of (question, solution, answer).

`load(spec)` reads, by `kind` (or "auto", detected from the path and the first row):

  archive   a SPARQ archive directory, or a SPARQ workdir holding `archive/` (read-only: a run
            may still be writing it; only committed rounds are read). Rows are the generated
            children (round > 0) with a readable question; solution = the first successful
            student verification (none for quality-0 items); the recorded quality, solve rate,
            skill-set, validity and round come along.
  phase2    a SPARQ phase-2 set (`phase2.jsonl` of a SPARQ workdir): one row per training pair.
  records   (prompt, completion) JSONL: EI `round_i/dataset.jsonl`, SFT data. The question is
            the prompt inside the lab / math template (the whole prompt otherwise); no
            reference answer.
  gsm8k, math, svamp, aime
            the real datasets' JSONL/Parquet files, through `data.math_tasks.load` (a GSM8K
            solution gets back its final answer, as the answer line the models train on).
  qa        any JSONL/Parquet rows with `question` (or `problem`) and optional `solution` (or
            `completion`, `response`) and `answer`.
  lab       `lab:SPLIT[:N]`: N problems (default 256) of a lab test split (in_dist, ood) with
            their reference solutions, made in process (the embedded default).

A row without the fields its kind needs is an error naming the file, line and field (fix the
file, or pick another kind with `kinds=`); archive items whose question could not be read are
counted in `Dataset.dropped`, never an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import jax
import numpy as np

from qdc_jax import storage
from qdc_jax.data import answers, arith, jsonl, lab_tasks, math_tasks
from qdc_jax.sparq.archive import Archive

KINDS = ("auto", "archive", "phase2", "records", "qa", "lab") + math_tasks.DATASETS
PHASE2_KEYS = ("question", "solution", "item_id", "quality")
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class Row:
  """One problem. `answer` is the reference (or the generator's intended) final answer; the
  `recorded_*` fields are what the source measured (SPARQ archives, phase-2 sets), else None."""
  question: str
  solution: Optional[str] = None
  answer: Optional[str] = None
  skill_set: Optional[tuple[str, ...]] = None
  recorded_quality: Optional[float] = None
  recorded_solve_rate: Optional[float] = None
  round: Optional[int] = None


@dataclasses.dataclass
class Dataset:
  name: str
  path: str
  kind: str
  rows: list[Row]
  dropped: dict = dataclasses.field(default_factory=dict)  # reason -> rows left out
  notes: list = dataclasses.field(default_factory=list)  # how rows were sampled or cut


def _archive_dir(path: str) -> Optional[str]:
  for d in (path, storage.join(path, "archive")):
    if storage.exists(storage.join(d, "round_000000.json")):
      return d
  return None


def _files(path: str) -> list[str]:
  if any(c in path for c in _GLOB_CHARS):
    files = storage.glob(path)
    if not files:
      raise FileNotFoundError(f"No dataset files match {path} (set --config.data.paths)")
    return files
  if not storage.is_file(path):
    raise FileNotFoundError(f"No such dataset file: {path} (set --config.data.paths)")
  return [path]


def _json_rows(path: str) -> list[tuple[str, dict]]:
  """(where, row) for every object row of a JSONL or Parquet file (or glob of shards)."""
  files = _files(path)
  if len(files) > 1:
    return [x for f in files for x in _json_rows(f)]
  path = files[0]
  if path.lower().endswith((".parquet", ".pq")):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with storage.path(path).open("rb") as fh:
      return [(f"{path}: row {i}", r) for i, r in enumerate(pq.read_table(fh).to_pylist())]
  return jsonl.read_objects(path)


def _field(where: str, row: dict, keys: tuple[str, ...], kind: str, required: bool = True
           ) -> Optional[str]:
  for k in keys:
    v = row.get(k)
    if v is not None:
      if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
      return str(v)
  if required:
    want = " or ".join(repr(k) for k in keys)
    raise ValueError(f"{where}: missing field {want} for a {kind!r} dataset (fields: "
                     f"{sorted(row)}); fix the row, or name the right kind in "
                     f"--config.data.kinds")
  return None


def detect_kind(path: str) -> str:
  """The kind of `path` (see the module docstring), from its layout and first row."""
  if path.startswith("lab:"):
    return "lab"
  if _archive_dir(path):
    return "archive"
  if storage.exists(path) and not storage.is_file(path):
    raise ValueError(f"{path} is a directory but not a SPARQ archive or workdir (no "
                     f"round_000000.json); point --config.data.paths at a file")
  rows = _json_rows(path)
  if not rows:
    raise ValueError(f"{path} has no rows")
  first = rows[0][1]
  if all(k in first for k in PHASE2_KEYS):
    return "phase2"
  if "prompt" in first and "completion" in first:
    return "records"
  if "question" in first and isinstance(first.get("answer"), str) and "####" in first["answer"]:
    return "gsm8k"
  if "problem" in first and "solution" in first and "level" in first:
    return "math"
  return "qa"


def _default_name(path: str, kind: str) -> str:
  if kind == "lab":
    return path.replace(":", "_")
  p = path.rstrip("/")
  base = os.path.basename(p)
  if kind == "archive" and base == "archive":
    base = os.path.basename(os.path.dirname(p))
  if kind == "phase2" and base == "phase2.jsonl":
    base = os.path.basename(os.path.dirname(p)) + "_phase2"
  return re.sub(r"\.(jsonl|json|parquet|pq)$", "", base)


def _with_answer_line(solution: Optional[str], answer: str) -> Optional[str]:
  """A reference solution that states its answer: GSM8K's steps lose their '#### N' line when
  read, so the answer line the models train on (`math_tasks.answer_line`) goes back on."""
  if solution is None or answers.extract_answer(solution) is not None:
    return solution
  return solution.rstrip() + "\n" + math_tasks.answer_line(answer)


def load(path: str, kind: str = "auto", name: str = "") -> Dataset:
  """The rows of one dataset (see the module docstring for `kind`)."""
  if kind not in KINDS:
    raise ValueError(f"Unknown dataset kind {kind!r}; choose one of {KINDS}")
  kind = detect_kind(path) if kind == "auto" else kind
  name = name or _default_name(path, kind)
  dropped: dict = {}
  if kind == "lab":
    parts = path.split(":")
    if (len(parts) not in (2, 3) or parts[0] != "lab" or parts[1] not in ("in_dist", "ood")
        or (len(parts) == 3 and not parts[2].isdigit())):
      raise ValueError(f"A lab dataset is 'lab:SPLIT[:N]' with SPLIT in_dist or ood and N "
                       f"rows (e.g. lab:ood:256), got {path!r}")
    n = int(parts[2]) if len(parts) == 3 else 256
    rows = [Row(p.text, p.solution, str(p.answer)) for p in lab_tasks.test_problems(parts[1], n)]
  elif kind == "archive":
    d = _archive_dir(path)
    if d is None:
      raise FileNotFoundError(f"No SPARQ archive at {path} (nor {path}/archive)")
    rows = []
    arch = Archive(d, read_only=True)
    # A running SPARQ job may commit a round while the processes list the archive: every
    # process reads the rounds process 0 saw, so all measure the same rows.
    committed = arch.rounds_committed()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      committed = int(multihost_utils.broadcast_one_to_all(np.int32(committed)))
    for it in arch.load_items(range(committed)):
      if it.round == 0:
        continue
      if not (it.question or "").strip():
        dropped["unreadable_question"] = dropped.get("unreadable_question", 0) + 1
        continue
      sol = it.successful_solutions[0] if it.successful_solutions else None
      rows.append(Row(it.question, sol, it.intended_answer, tuple(it.skill_set), it.quality,
                      it.solve_rate, it.round))
  elif kind == "phase2":
    rows = []
    for where, r in _json_rows(path):
      q = _field(where, r, ("question",), kind)
      s = _field(where, r, ("solution",), kind)
      skill_set = r.get("skill_set")
      rows.append(Row(q, s, _field(where, r, ("answer",), kind, required=False),
                      tuple(skill_set) if isinstance(skill_set, list) else None,
                      r.get("quality"), r.get("solve_rate"), r.get("round")))
  elif kind == "records":
    _files(path)  # a missing file names --config.data.paths
    rows = [Row(arith.prompt_question(r["prompt"]) or r["prompt"], r["completion"])
            for r in jsonl.read_records(path)]
  elif kind in math_tasks.DATASETS:
    rows = [Row(e.question, _with_answer_line(e.solution, e.answer), e.answer)
            for e in math_tasks.load(kind, path, flag="--config.data.paths")]
  else:  # qa
    rows = [Row(_field(w, r, ("question", "problem"), kind),
                _field(w, r, ("solution", "completion", "response"), kind, required=False),
                _field(w, r, ("answer",), kind, required=False))
            for w, r in _json_rows(path)]
  empty = [i for i, r in enumerate(rows) if not r.question.strip()]
  if empty:
    raise ValueError(f"{path} ({kind}): {len(empty)} rows have an empty question (first: row "
                     f"{empty[0] + 1}); drop them from the file")
  if not rows:
    raise ValueError(f"{path} ({kind}) has no usable rows (dropped: {dropped})")
  return Dataset(name, path, kind, rows, dropped)


def downstream_scores(path: str) -> Optional[dict]:
  """For a dataset inside a finished SPARQ workdir (the workdir, its archive, its phase2.jsonl):
  what distilling the student on that workdir's phase-2 set gave, from its report.json —
  {"sparq": {...}, "baseline": {...}} with in-distribution pass@1 and OOD pass@1 / pass@n
  (n = the largest evaluated), and the number of test problems. None otherwise."""
  if path.startswith("lab:"):
    return None
  p = path.rstrip("/")
  candidates = [p, os.path.dirname(p)]
  for d in candidates:
    rep_path = storage.join(d, "report.json")
    if not storage.exists(rep_path):
      continue
    rep = storage.read_json(rep_path)
    if not isinstance(rep, dict) or "sparq" not in rep or "baseline" not in rep:
      continue
    out = {}
    for model in ("baseline", "sparq"):
      m = rep[model]
      row = {"in_dist_pass@1": m.get("in_dist", {}).get("pass@1"),
             "in_dist_problems": m.get("in_dist", {}).get("num_problems")}
      ood = m.get("ood", {})
      ks = sorted(int(k.split("@")[1]) for k in ood if k.startswith("pass@"))
      if ks:
        row.update({"ood_pass@1": ood.get("pass@1"), f"ood_pass@{ks[-1]}": ood[f"pass@{ks[-1]}"],
                    "ood_problems": ood.get("num_problems")})
      out[model] = row
    out["workdir"] = d
    out["filter"] = rep.get("config", {}).get("phase2", {}).get("filter")
    out["strategy"] = rep.get("config", {}).get("sparq", {}).get("strategy")
    return out
  return None

