"""SPARQ skills: vocabulary, normalisation with accounting, annotators, reply parsing."""
import pytest

from qdc_jax import registry
from qdc_jax.data import arith
from qdc_jax.sparq import skills as S


def test_vocabulary_is_the_m_most_common_with_alphabetical_ties():
  annotations = [["Algebra", "geometry"], ["algebra", "algebra"], ["counting"],
                 ["geometry", "algebra"], ["counting"], ["zeta"], ["beta"]]
  vocab = S.SkillVocabulary.from_seed(annotations, m=4)
  # algebra 3 (a repeat inside one annotation counts once), counting 2 and geometry 2 tie
  # (alphabetical), then beta and zeta tie at 1: beta.
  assert vocab.skills == ("algebra", "counting", "geometry", "beta")
  assert vocab.counts == (3, 2, 2, 1)
  assert S.SkillVocabulary.from_seed(list(reversed(annotations)), m=4) == vocab
  assert S.SkillVocabulary.from_json(vocab.to_json()) == vocab
  with pytest.raises(ValueError):
    S.SkillVocabulary.from_seed(annotations, m=0)


def test_spelling_variants_are_one_skill():
  vocab = S.SkillVocabulary.from_seed(
      [["large_numbers"], ["large_numbers"], ["Large Numbers"], ["x"]], m=5)
  assert vocab.skills == ("large_numbers", "x") and vocab.counts == (3, 1)
  assert "large-numbers" in vocab and vocab.rank("LARGE numbers") == 0


def test_normalise_keeps_k_by_rank_and_reports_unknown():
  vocab = S.SkillVocabulary(skills=("a", "b", "c", "d"), counts=(9, 8, 7, 6))
  assert vocab.normalise([" D ", "b", "mystery", "A.", "c", "b"]) == (("a", "b", "c"),
                                                                       ["mystery"])
  assert vocab.normalise(["d", "c"], k=3) == (("c", "d"), [])
  assert vocab.normalise([]) == ((), [])
  sets, counter = S.skill_sets_of(vocab, [["a", "b", "c", "d"], ["x", "x"], ["b", "y"], []])
  assert sets == [("a", "b", "c"), (), ("b",), ()]
  assert counter.num_items == 4 and counter.num_truncated == 1 and counter.num_empty == 2
  assert counter.num_with_unknown == 2 and dict(counter.unknown) == {"x": 1, "y": 1}
  sets, counter = S.skill_sets_of(vocab, [["x"]], counter=counter)
  report = counter.report()
  assert report["items"] == 5 and report["top_unknown"][0] == ["x", 2]
  assert S.SkillCounter.from_json(counter.to_json()) == counter
  one = S.SkillCounter().add(["q", "q"], truncated=2, empty=True)
  assert (one.num_items, one.unknown, one.num_truncated, one.num_empty) == (1, {"q": 1}, 2, 1)


def test_coverage_and_div():
  sets = [("a", "b"), ("a", "b"), ("b",), (), ("c", "d")]
  assert S.coverage(sets) == 3 and S.coverage(sets, include_empty=True) == 4
  assert S.div(sets) == 4 and S.div([]) == 0


def test_oracle_annotator_matches_arith_and_is_registered():
  problems = arith.make_split("in_dist", 20, seed=1)
  annotator = registry.get("annotator", "oracle")()
  assert isinstance(annotator, S.SkillAnnotator)
  got = annotator.annotate([p.text for p in problems] + ["not arithmetic", None],
                           [None] * 22)
  assert got[:20] == [list(p.skills) for p in problems]
  assert got[20:] == [[], []]
  vocab = S.SkillVocabulary.from_seed(got, m=100)
  assert set(vocab.skills) <= set(arith.SKILLS)


@pytest.mark.parametrize("text, want", [
    ("algebra, geometry", ["algebra", "geometry"]),
    ("Skills: Algebra; Number Theory.", ["algebra", "number theory"]),
    ("- algebra\n- **Counting**\n* probability\n\u2022 geometry",
     ["algebra", "counting", "probability", "geometry"]),
    ("1. algebra\n2) fractions\n(3) percent", ["algebra", "fractions", "percent"]),
    ('["algebra", "geometry"]', ["algebra", "geometry"]),
    ("Here are the skills:\nalgebra, algebra, ALGEBRA", ["algebra"]),
    ("", []), ("   \n\n ,,, ;", []), (None, []), (42, []),
    ("x" * 500 + ", algebra", ["algebra"]),
])
def test_parse_skill_list(text, want):
  assert S.parse_skill_list(text) == want


def test_parse_skill_list_caps_size_and_stays_fast():
  names = S.parse_skill_list(", ".join(f"s{i}" for i in range(1000)))
  assert len(names) == S.MAX_SKILLS_PARSED
  assert S.parse_skill_list("a" * 10**6 + ",\n" * 10**5) == []
