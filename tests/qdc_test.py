"""QDC measures: each against an independent reference (nltk's BLEU, naive O(N^2) numpy, a
per-sequence forward pass), the dataset readers on files written here, and the workload end to
end with its resume."""

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax import embed, sharding
from qdc_jax.models import configs
from qdc_jax.models import transformer as T
from qdc_jax.qdc import datasets as D
from qdc_jax.qdc import measures as M
from qdc_jax.qdc import profile as P
from qdc_jax.sparq import archive as A

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ text measures


def test_self_bleu_equals_nltk_sentence_bleu_against_all_other_rows():
  bleu = pytest.importorskip("nltk.translate.bleu_score")
  rng = random.Random(0)
  for trial in range(4):
    rows = [[rng.choice("abcdefg"[:3 + trial]) for _ in range(rng.randint(0, 12))]
            for _ in range(25)]
    rows += [list(rows[3]), ["a"]]  # an exact duplicate and a one-token row
    ours = M.self_bleu_per_row(rows)
    ref = [bleu.sentence_bleu([r for j, r in enumerate(rows) if j != i], h,
                              smoothing_function=bleu.SmoothingFunction().method1)
           if h else 0.0 for i, h in enumerate(rows)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)


def test_self_bleu_of_identical_rows_is_one_and_needs_two_rows():
  rows = [M.words("Compute 12 + 7 and then 3 more.")] * 3
  np.testing.assert_allclose(M.self_bleu_per_row(rows), 1.0)
  with pytest.raises(ValueError, match="at least 2 rows"):
    M.self_bleu_per_row(rows[:1])


def test_distinct_n_by_hand():
  rows = [M.words("a b a"), M.words("a b c")]
  assert M.distinct_n(rows, 1) == 3 / 6  # a, b, c of 6 unigrams
  assert M.distinct_n(rows, 2) == 3 / 4  # ab, ba, bc of 4 bigrams
  assert M.distinct_n(rows, 4) is None
  assert M.words("Eli has 7 seeds.") == ["eli", "has", "7", "seeds", "."]


# ------------------------------------------------------------------ embedding measures


def _naive_cos(x):
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  return u @ u.T


def test_dispersion_vendi_and_nn_distance_against_naive_numpy():
  x = np.random.default_rng(1).normal(size=(150, 12)) + 0.5
  s = _naive_cos(x)
  n = len(x)
  np.testing.assert_allclose(M.dispersion(x), 1 - (s.sum() - n) / (n * (n - 1)), rtol=1e-5)
  lam = np.linalg.eigvalsh(s / n)
  lam = lam[lam > 1e-12]
  np.testing.assert_allclose(M.vendi(x), np.exp(-np.sum(lam * np.log(lam))), rtol=1e-4)
  d = 1 - s
  np.fill_diagonal(d, np.inf)
  np.testing.assert_allclose(M.nn_distance(x, block=64), d.min(axis=1), atol=2e-6)


def test_vendi_closed_forms():
  assert M.vendi(np.tile([[1.0, 2.0, 0.0]], (7, 1))) == pytest.approx(1.0, abs=1e-5)
  assert M.vendi(np.eye(5) * 3.0) == pytest.approx(5.0, rel=1e-5)  # orthogonal rows
  assert M.dispersion(np.eye(4)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="NaN"):
    M.dispersion(np.array([[1.0, np.nan], [0.0, 1.0]]))


def _tiny_model():
  cfg = configs.get_model_config("lab_tiny", num_layers=2, sliding_window=4)
  model = T.Transformer(cfg)
  params = T.nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
  return model, params


@pytest.mark.parametrize("layer", [None, 1])
def test_mean_pooled_embeddings_are_each_sequences_own_mean(layer):
  model, params = _tiny_model()
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(3, 100, n)) for n in (5, 17, 9, 70, 2, 12, 21)]
  got, truncated = embed.mean_pooled_embeddings(params, seqs, model=model, layer=layer,
                                                batch_size=3, skip_first=1)
  assert truncated == 0 and got.shape == (len(seqs), model.config.d_model)
  for i, s in enumerate(seqs):  # one sequence at a time, no padding
    h = np.asarray(embed.hidden_states(params, jnp.asarray([s], jnp.int32), model=model,
                                       layer=layer))[0]
    np.testing.assert_allclose(got[i], h[1:].mean(axis=0), atol=2e-5)
  cut, truncated = embed.mean_pooled_embeddings(params, seqs, model=model, layer=layer,
                                                max_tokens=10)
  assert truncated == 4
  h = np.asarray(embed.hidden_states(params, jnp.asarray([seqs[3][:10]], jnp.int32),
                                     model=model, layer=layer))[0]
  np.testing.assert_allclose(cut[3], h.mean(axis=0), atol=2e-5)


def test_mean_pooled_embeddings_on_a_mesh_equal_one_device():
  model, params = _tiny_model()
  seqs = [[5, 6, 7, 8, 9][:n] for n in (1, 2, 3, 4, 5)] + [[11] * 40]
  want, _ = embed.mean_pooled_embeddings(params, seqs, model=model)
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  shardings = sharding.logical_to_shardings(T.nn.get_partition_spec(abstract), mesh,
                                            rules)["params"]
  got, _ = embed.mean_pooled_embeddings(jax.device_put(params, shardings), seqs, model=model,
                                        batch_size=3, mesh=mesh, rules=rules,
                                        param_shardings=shardings)
  np.testing.assert_allclose(got, want, atol=2e-5)


# ------------------------------------------------------------------ datasets


def _write_rows(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _archive(directory, with_debris=False):
  arch = A.Archive(str(directory))
  seed = A.ArchiveItem(id=0, parent_id=None, round=0, strategy="seed",
                       question="Compute 2 + 3.", intended_answer="5")
  arch.commit_round(0, [seed], {})
  kids = [A.ArchiveItem(id=1, parent_id=0, round=1, strategy="s", question="Compute 2 * 3.",
                        intended_answer="6", k=4, num_correct=2, solve_rate=0.5, quality=0.5,
                        skill_set=("multiplication",),
                        successful_solutions=("2*3=6\nThe answer is 6.",), valid=True),
          A.ArchiveItem(id=2, parent_id=0, round=1, strategy="s", question=None,
                        intended_answer=None, parse_error="parse: no question")]
  arch.commit_round(1, kids, {})
  kids2 = [A.ArchiveItem(id=3, parent_id=1, round=2, strategy="s",
                         question="Compute 2 * 3 - 1.", intended_answer="9", k=4,
                         skill_set=("multiplication", "subtraction"), valid=False)]
  arch.commit_round(2, kids2, {})
  if with_debris:
    (directory / "round_000003.jsonl.tmp").write_text("half")
  return str(directory)


def test_archive_reads_children_read_only(tmp_path):
  d = _archive(tmp_path / "work" / "archive", with_debris=True)
  for path in (d, str(tmp_path / "work")):  # the archive, or the SPARQ workdir holding it
    ds = D.load(path)
    assert ds.kind == "archive" and ds.name == "work"
    assert [r.question for r in ds.rows] == ["Compute 2 * 3.", "Compute 2 * 3 - 1."]
    assert ds.rows[0].solution.startswith("2*3=6") and ds.rows[1].solution is None
    assert ds.rows[0].recorded_quality == 0.5 and ds.rows[1].round == 2
    assert ds.dropped == {"unreadable_question": 1}
  assert os.path.exists(os.path.join(d, "round_000003.jsonl.tmp"))  # a reader deletes nothing
  (tmp_path / "work" / "archive" / "round_000003.jsonl").write_text("uncommitted\n")
  ro = A.Archive(d, read_only=True)
  assert ro.rounds_committed() == 3
  assert os.path.exists(os.path.join(d, "round_000003.jsonl"))
  with pytest.raises(ValueError, match="read-only"):
    ro.commit_round(3, [], {})
  with pytest.raises(FileNotFoundError, match="No SPARQ archive"):
    A.Archive(str(tmp_path / "nothing"), read_only=True)


def test_kinds_are_detected_and_rows_read(tmp_path):
  p2 = _write_rows(tmp_path / "phase2.jsonl", [
      {"prompt": "x", "completion": "s", "question": "Q1", "solution": "s", "answer": "3",
       "quality": 0.25, "solve_rate": 0.75, "skill_set": ["a"], "item_id": 4, "round": 2}])
  rec = _write_rows(tmp_path / "dataset.jsonl", [
      {"prompt": "Question: Compute 1 + 1.\nSolution:\n", "completion": "1+1=2"},
      {"prompt": "free prompt", "completion": "c"}])
  gsm = _write_rows(tmp_path / "gsm.jsonl", [
      {"question": "Tom has 2 apples and gets 3.", "answer": "2+3=<<2+3=5>>5\n#### 5"}])
  math_ = _write_rows(tmp_path / "math.jsonl", [
      {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": "Level 1",
       "type": "Algebra"}])
  qa = _write_rows(tmp_path / "mine.jsonl", [{"problem": "P?", "response": "R", "answer": 1}])
  got = {p: D.load(p) for p in (p2, rec, gsm, math_, qa)}
  assert [got[p].kind for p in (p2, rec, gsm, math_, qa)] == [
      "phase2", "records", "gsm8k", "math", "qa"]
  assert got[p2].name == tmp_path.name + "_phase2" and got[p2].rows[0].skill_set == ("a",)
  assert [r.question for r in got[rec].rows] == ["Compute 1 + 1.", "free prompt"]
  assert got[gsm].rows[0].answer == "5" and "<<" not in got[gsm].rows[0].solution
  assert got[math_].rows[0].answer == "2"
  assert got[qa].rows[0] == D.Row("P?", "R", "1")
  lab = D.load("lab:ood:5")
  assert lab.kind == "lab" and len(lab.rows) == 5 and lab.name == "lab_ood_5"


def test_bad_rows_name_file_line_and_field(tmp_path):
  bad = _write_rows(tmp_path / "bad.jsonl", [{"question": "ok"}, {"solution": "no question"}])
  with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'question' or 'problem'"):
    D.load(bad)
  (tmp_path / "broken.jsonl").write_text('{"question": "a"}\n{not json\n')
  with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
    D.load(str(tmp_path / "broken.jsonl"))
  with pytest.raises(ValueError, match="Unknown dataset kind"):
    D.load(bad, kind="csv")
  os.makedirs(tmp_path / "somedir")
  with pytest.raises(ValueError, match="not a SPARQ archive"):
    D.load(str(tmp_path / "somedir"))


# ------------------------------------------------------------------ profile


def test_profile_quality_and_complexity_by_hand():
  rows = [D.Row("Compute 12 + 7.", "12+7=19\nThe answer is 19.", "19"),
          D.Row("Compute 3 * (4 - 1).", "4-1=3\n3*3=9\nThe answer is 9.", "8"),  # wrong answer
          D.Row("How tall is a tree?", None, None)]
  ds = D.Dataset("t", "t", "qa", rows)
  p = P.profile(ds, skill_sets=[("addition",), ("multiplication", "subtraction"), ()],
                skill_source="given")
  m = p["measures"]
  assert m["correct"] == 0.5  # row 1 reaches 19; row 2's solution says 9, answer 8
  assert m["lab_valid"] == 0.5  # oracle: 3 * (4 - 1) is 9, not 8
  assert m["lab_parse_rate"] == pytest.approx(2 / 3)
  assert m["steps"] == 1.5 and m["lab_ops"] == 1.5 and m["lab_max_digits"] == 1.5
  assert m["skill_coverage"] == 2 and m["skill_div"] == 3 and m["num_skills"] == 1.0
  assert m["lab_op_mix"] == {"+": 1 / 3, "-": 1 / 3, "*": 1 / 3}
  assert p["rows"]["correct"] == [1.0, 0.0, None]
  assert "embedding_dispersion" not in m  # no embeddings given


def test_skill_sets_keep_k_and_count_every_skill(monkeypatch):
  """The LM path's accounting, with a scripted annotator: one vocabulary over all datasets,
  skill-sets cut to k (the thesis's), every known skill kept for coverage and counts."""
  from qdc_jax.experiments import qdc as Q  # pylint: disable=g-import-not-at-top
  from qdc_jax.sparq import agents  # pylint: disable=g-import-not-at-top
  answers = {"q1": ["Algebra", "geometry", "counting"], "q2": ["algebra", "zzz-once"],
             "q3": ["algebra", "geometry", "counting", "primes"]}

  class Scripted:
    def __init__(self, lm, k):
      del lm, k

    def annotate(self, questions, solutions=None):
      return [answers[q] for q in questions]

  monkeypatch.setattr(agents, "load_lm", lambda *a, **k: None)
  monkeypatch.setattr(agents, "LMAnnotator", Scripted)
  cfg = _config(skills={"annotator": "lm", "model_dir": "x", "k": 2, "num_skills": 4})
  a = D.Dataset("a", "a", "qa", [D.Row("q1"), D.Row("q2")])
  b = D.Dataset("b", "b", "qa", [D.Row("q3")])
  capped, every, source = Q.skill_sets(cfg, [a, b], None, None)
  assert source == "lm"
  # Vocabulary by frequency: algebra 3, counting 2, geometry 2, then one of the singletons.
  assert capped[0][0] == ("algebra", "counting") and capped[1][0] == ("algebra", "counting")
  assert every[0][0] == ("algebra", "counting", "geometry")
  assert len(every[1][0]) == 4 or every[1][0] == ("algebra", "counting", "geometry")
  p = P.profile(b, skill_sets=capped[1], skill_source=source, all_skills=every[1], skill_k=2)
  assert p["measures"]["skill_coverage"] == 1 and p["measures"]["num_skills"] == len(
      every[1][0])
  assert any("more than k=2 skills" in n for n in p["notes"])


def _config(**sections):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_qdc_cfg", os.path.join(ROOT, "configs",
                                                                         "qdc.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for sec, values in sections.items():
    for k, v in values.items():
      c[sec][k] = v
  return c


def test_max_rows_and_nearest_neighbour_samples_are_seeded_and_stated():
  from qdc_jax.experiments import qdc as Q  # pylint: disable=g-import-not-at-top
  cfg = _config(data={"paths": "lab:ood:20,lab:in_dist:7", "max_rows": 6})
  a, b = Q.load_datasets(cfg)
  assert len(a.rows) == 6 and len(b.rows) == 6
  assert [r.question for r in a.rows] == [r.question for r in Q.load_datasets(cfg)[0].rows]
  assert a.notes == ["a seeded sample of 6 of its 20 rows"]
  x = np.random.default_rng(0).normal(size=(6, 5))
  p = P.profile(a, skill_sets=None, skill_source="none", embeddings=x, nn_rows=np.array([0, 2, 5]))
  assert [v is not None for v in p["rows"]["nn_distance"]] == [1, 0, 1, 0, 0, 1]
  assert any("sample of 3 of 6" in n for n in p["notes"])
  with pytest.raises(ValueError, match="lab:SPLIT"):
    D.load("lab:ood:abc")


def test_coverage_over_rounds_counts_new_skill_sets():
  rows = [D.Row("q", round=1), D.Row("q", round=1), D.Row("q", round=2), D.Row("q", round=3)]
  ds = D.Dataset("a", "a", "archive", rows)
  got = P.coverage_over_rounds(ds, [("a",), ("b",), ("a",), ("a", "b")])
  assert got == [(1, 2, 2), (2, 2, 3), (3, 3, 4)]
  assert P.coverage_over_rounds(D.Dataset("l", "l", "lab", [D.Row("q")]), [()]) is None


# ------------------------------------------------------------------ the workload


def _main(workdir, *flags):
  cmd = [sys.executable, "-m", "qdc_jax.main", "--config=configs/qdc.py:smoke",
         f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_qdc_smoke_on_archive_gsm8k_and_lab_resumes(tmp_path):
  arch = _archive(tmp_path / "sparq" / "archive")
  gsm = _write_rows(tmp_path / "gsm.jsonl", [
      {"question": f"Tom has {i} apples and gets 3 more. How many?",
       "answer": f"{i}+3=<<{i}+3={i + 3}>>{i + 3}\n#### {i + 3}"} for i in range(6)])
  work = tmp_path / "qdc"
  paths = f"--config.data.paths={arch},{gsm},lab:ood:8"
  r = _main(work, paths, "--config.skills.annotator=oracle")
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads((work / "report.json").read_text())
  assert set(rep["datasets"]) == {"sparq", "gsm", "lab_ood_8"}
  s, g, lab = (rep["datasets"][k]["measures"] for k in ("sparq", "gsm", "lab_ood_8"))
  assert s["rows"] == 2 and s["recorded_quality"] == 0.25 and s["lab_valid"] == 0.5
  assert g["correct"] == 1.0 and g["lab_parse_rate"] == 0.0 and g["steps"] == 1.0
  assert lab["lab_valid"] == 1.0 and 0 <= lab["student_solve_rate"] <= 1
  assert 0 < lab["embedding_dispersion"] < 1 and lab["vendi"] >= 1
  assert rep["datasets"]["sparq"]["coverage"] == [[1, 1, 1], [2, 2, 2]]
  md = (work / "report.md").read_text()
  assert "| measure | sparq | gsm | lab_ood_8 |" in md and "self-BLEU" in md
  for png in ("histograms.png", "qd_scatter.png", "coverage.png"):
    assert (work / png).stat().st_size > 1000, png
  # A finished workdir returns its report; a killed one (no report.json yet) reuses the
  # profiles it had cached: a planted value comes back instead of being recomputed.
  cache = json.loads((work / "qdc_profiles.json").read_text())
  gsm_key = next(k for k in cache if k.startswith("gsm@"))
  cache[gsm_key]["measures"]["distinct_1"] = 0.123456
  (work / "qdc_profiles.json").write_text(json.dumps(cache))
  os.remove(work / "report.json")
  r = _main(work, paths, "--config.skills.annotator=oracle")
  assert r.returncode == 0, r.stderr[-3000:]
  rep2 = json.loads((work / "report.json").read_text())
  assert rep2["datasets"]["gsm"]["measures"]["distinct_1"] == 0.123456
  # A dataset that changed is measured again, finished report or not; the others are not.
  with open(gsm, "a") as f:
    f.write(json.dumps({"question": "Ann has 9 pens and loses 4. How many?",
                        "answer": "9-4=<<9-4=5>>5\n#### 5"}) + "\n")
  planted = json.loads((work / "qdc_profiles.json").read_text())
  lab_key = next(k for k in planted if k.startswith("lab_ood_8@"))
  planted[lab_key]["measures"]["distinct_1"] = 0.654321
  (work / "qdc_profiles.json").write_text(json.dumps(planted))
  r = _main(work, paths, "--config.skills.annotator=oracle")
  assert r.returncode == 0, r.stderr[-3000:]
  rep3 = json.loads((work / "report.json").read_text())["datasets"]
  assert rep3["gsm"]["measures"]["rows"] == 7
  assert rep3["gsm"]["measures"]["distinct_1"] != 0.123456
  assert rep3["lab_ood_8"]["measures"]["distinct_1"] == 0.654321
  # Other settings on the same workdir are refused, naming what changed.
  r = _main(work, f"--config.data.paths={gsm}", "--config.skills.annotator=oracle")
  assert r.returncode != 0 and "data.paths" in r.stderr


def test_names_and_kinds_must_match_paths(tmp_path):
  r = _main(tmp_path / "w", "--config.data.paths=lab:ood:4,lab:in_dist:4",
            "--config.data.names=one")
  assert r.returncode != 0 and "one per path" in r.stderr


def test_orm_scores_and_lm_annotator_through_the_workload(tmp_path):
  """The ORM measure is the reward model's own score of each solution, read here directly
  (a reference independent of the workload); the LM annotator path runs (the shipped lab
  generator stands in for an instruction model: its free-form labels are whatever it writes,
  so only the accounting is checked)."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from qdc_jax import model_io  # pylint: disable=g-import-not-at-top
  from qdc_jax.data import arith  # pylint: disable=g-import-not-at-top
  from qdc_jax.models import heads  # pylint: disable=g-import-not-at-top
  from qdc_jax.rl import reward_models as rm  # pylint: disable=g-import-not-at-top
  cfg = configs.get_model_config("lab_tiny")
  model = heads.RewardModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  params["head"]["w"] = jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model,))
  rm.save(str(tmp_path / "rm"), cfg, params,
          tokenizer_meta={"kind": "char", "alphabet": arith.ALPHABET})
  work = tmp_path / "w"
  r = _main(work, "--config.data.paths=lab:ood:5", f"--config.orm.model_dir={tmp_path / 'rm'}",
            "--config.student.enabled=False", "--config.embed.model_dir=none",
            "--config.skills.annotator=lm",
            f"--config.skills.model_dir={model_io.asset_path('lab_generator')}")
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads((work / "report.json").read_text())["datasets"]["lab_ood_5"]
  rows = D.load("lab:ood:5").rows
  want = rm.load(str(tmp_path / "rm")).final_scores(
      [arith.PROMPT_TEMPLATE.format(question=x.question) for x in rows],
      [x.solution for x in rows])
  assert got["measures"]["orm_score"] == pytest.approx(float(np.mean(want)), rel=1e-5)
  assert "skill-sets from lm" in got["notes"]
  assert "embedding_dispersion" not in got["measures"]


def test_downstream_scores_of_a_sparq_workdir(tmp_path):
  ev = {"in_dist": {"num_problems": 8, "pass@1": 0.25},
        "ood": {"num_problems": 8, "pass@1": 0.1, "pass@4": 0.3}}
  (tmp_path / "report.json").write_text(json.dumps(
      {"baseline": ev, "sparq": {**ev, "in_dist": {"num_problems": 8, "pass@1": 0.5}},
       "config": {"phase2": {"filter": "qd"}, "sparq": {"strategy": "static_uniform"}}}))
  _write_rows(tmp_path / "phase2.jsonl", [{"question": "q", "solution": "s"}])
  got = D.downstream_scores(str(tmp_path / "phase2.jsonl"))
  assert got["sparq"]["in_dist_pass@1"] == 0.5 and got["baseline"]["ood_pass@4"] == 0.3
  assert got["filter"] == "qd" and got["strategy"] == "static_uniform"
  assert D.downstream_scores("lab:ood:4") is None
  assert D.downstream_scores(str(tmp_path / "elsewhere" / "x.jsonl")) is None
