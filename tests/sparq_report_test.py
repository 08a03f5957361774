"""SPARQ report pieces on a finished run's workdir: loading, rounds and niche plots, tables."""
import os

import pytest

from qdc_jax.sparq import metrics as M
from qdc_jax.sparq import report
from qdc_jax.sparq.archive import Archive, ArchiveItem


def _item(i, round_, quality, skill_set, question="Compute 1 + 1.", valid=None):
  return ArchiveItem(id=i, parent_id=None if round_ == 0 else 0, round=round_, strategy="t",
                     question=question, intended_answer="2", k=4,
                     num_correct=round(4 * (1 - quality)) if quality else 0,
                     solve_rate=(1 - quality) if quality else 0.0, quality=quality,
                     skill_set=skill_set, valid=valid)


def _run(tmp_path):
  arch = Archive(str(tmp_path / "archive"))
  rounds = [[_item(0, 0, 0.0, ("addition",))],
            [_item(1, 1, 0.5, ("addition",), valid=True),
             _item(2, 1, 0.25, ("addition", "carrying"), "What is 19 | 1?\nThen 2.", False)],
            [_item(3, 2, 0.75, ("addition",), valid=True), _item(4, 2, 0.0, (), None)]]
  for r, items in enumerate(rounds):
    arch.commit_round(r, items, {})
  return [it for items in rounds for it in items]


def test_load_run_reads_the_archive_and_report_or_says_what_is_missing(tmp_path):
  items = _run(tmp_path)
  # A round being written by a live run: not committed, so not read, and left in place.
  (tmp_path / "archive" / "round_000003.jsonl").write_text("{}\n")
  got, rep = report.load_run(str(tmp_path))
  assert got == items and rep == {}  # no report.json yet: an unfinished run
  assert (tmp_path / "archive" / "round_000003.jsonl").exists()
  (tmp_path / "report.json").write_text('{"num_training_pairs": 3}')
  assert report.load_run(str(tmp_path))[1] == {"num_training_pairs": 3}
  with pytest.raises(FileNotFoundError, match="no SPARQ archive"):
    report.load_run(str(tmp_path / "elsewhere"))
  assert not (tmp_path / "elsewhere").exists()  # looking created nothing


def test_rounds_and_niche_plots_and_the_examples_table(tmp_path):
  items = _run(tmp_path)
  rows = M.by_round(items)
  report.plot_rounds(rows, str(tmp_path / "rounds.png"), title="t")
  niches = M.niches(M.children(items))
  report.plot_niches(niches, str(tmp_path / "niches.png"))
  report.plot_niches([], str(tmp_path / "none.png"))
  for name in ("rounds.png", "niches.png", "none.png"):
    assert os.path.getsize(tmp_path / name) > 1000
  table = report.niches_markdown(niches, per_niche=2)
  lines = table.splitlines()
  assert lines[0].startswith("| niche (skill-set) | problems | best quality |")
  # The best niche first with its two best problems; '|' and line breaks escaped in cells.
  assert lines[2] == ("| addition | 2 | 0.750 | 0.625 | Compute 1 + 1. | 2 | yes | 0.750 | "
                      "1/4 | t, round 2 |")
  assert lines[3].startswith("|  |  |  |  | Compute 1 + 1. | 2 | yes | 0.500 | 2/4 |")
  assert lines[4].startswith("| addition + carrying | 1 | 0.250 | 0.250 | What is 19 \\| 1? "
                             "Then 2. | 2 | no |")
  assert len(lines) == 5
  assert "1 more niches" in report.niches_markdown(niches, top=1)
  assert "(none" in report.niches_markdown([])
