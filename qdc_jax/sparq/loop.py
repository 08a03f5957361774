"""SPARQ phase 1: rounds of select -> mutate -> verify (K rollouts) -> annotate -> update.

Round r's randomness comes from (seed, r) alone, and each round is committed atomically to
the archive together with the strategy state and running statistics. So a run killed at any
moment restarts at the first uncommitted round and produces exactly what an uninterrupted
run would have: nothing lost, nothing duplicated, the same random stream.
Round 0 holds the seed set (strategy "seed"), so item ids are unique across seeds and children.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging

from qdc_jax import registry
from qdc_jax import sampling
from qdc_jax.sparq import metrics as sparq_metrics
from qdc_jax.sparq import quality as quality_lib
from qdc_jax.sparq import skills as skills_lib
from qdc_jax.sparq import strategies  # registers the strategies
from qdc_jax.sparq.archive import Archive, ArchiveItem

del strategies  # imported for its registry side effect


@dataclasses.dataclass
class Roles:
  generator: Any  # agents.Generator
  student: Any  # agents.Student
  # skills.SkillAnnotator as built, naming skills free-form: the loop annotates the seeds with
  # it and everything later with `annotator.with_vocabulary(<the seed vocabulary>)`.
  annotator: Any
  # Lab only: the oracle's verdict on (question, intended answer); None elsewhere.
  validity: Optional[Callable[[str, Optional[str]], Optional[bool]]] = None


@dataclasses.dataclass(frozen=True)
class Seed:
  question: str
  solution: str
  answer: str


def _strategy_kwargs(sc) -> dict:
  if sc.strategy == "dynamic_uniform":
    return {"capacity": sc.working_set_size}
  if sc.strategy == "dynamic_diverse":
    return {"niche_limit": sc.niche_limit}
  return {}


def fingerprint(seeds: Sequence[Seed], sc) -> str:
  """What must not change between a run and its resume: phase-1 knobs (not the number of
  rounds, which may grow), the seed set and what a key samples (the sampler's version)."""
  knobs = {k: v for k, v in sc.to_dict().items() if k != "rounds"}
  blob = json.dumps([knobs, [dataclasses.astuple(s) for s in seeds],
                     sampling.SAMPLER_VERSION], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def init_archive(archive: Archive, seeds: Sequence[Seed], roles: Roles, sc
                 ) -> skills_lib.SkillVocabulary:
  """Round 0: annotate the seed set (free-form), build the skill vocabulary and the initial W."""
  raw = roles.annotator.annotate([s.question for s in seeds], [s.solution for s in seeds])
  vocab = skills_lib.SkillVocabulary.from_seed(raw, m=sc.num_skills)
  sets, counter = skills_lib.skill_sets_of(vocab, raw, k=sc.max_skills_per_problem)
  items = [ArchiveItem(id=i, parent_id=None, round=0, strategy="seed", question=s.question,
                       intended_answer=s.answer, skill_set=st,
                       # The reference solution rides along: parents are shown with one.
                       successful_solutions=(s.solution,))
           for i, (s, st) in enumerate(zip(seeds, sets))]
  strategy = registry.get("strategy", sc.strategy)
  state = strategy.init(items, **_strategy_kwargs(sc))
  stats = sparq_metrics.ArchiveStats()
  archive.commit_round(0, items, {"strategy_state": state.to_json(),
                                  "vocabulary": vocab.to_json(), "stats": stats.to_json(),
                                  "skill_counter": counter.to_json(), "times": {},
                                  "fingerprint": fingerprint(seeds, sc)})
  return vocab


def run_rounds(archive: Archive, seeds: Sequence[Seed], roles: Roles, sc, *,
               logger=None) -> list[ArchiveItem]:
  """Phase 1 up to `sc.rounds` committed rounds (resuming after the last committed one)."""
  if archive.rounds_committed() == 0:
    init_archive(archive, seeds, roles, sc)
  saved = archive.latest_state()
  strategy = registry.get("strategy", sc.strategy)
  made_with = archive.load_state(0).get("fingerprint")
  if made_with != fingerprint(seeds, sc):
    raise ValueError(f"The archive in {archive.directory} was made with other sparq.* settings, "
                     f"another seed set or another sampler version (only sparq.rounds may "
                     f"change on resume): use a "
                     f"fresh --workdir, or the settings it was made with")
  state = strategy.state_from_json(saved["strategy_state"])
  # Round 0's vocabulary, whether made just now or by the run being resumed: from here on the
  # annotator labels with its skills (thesis 4.3.1) instead of naming new ones.
  vocab = skills_lib.SkillVocabulary.from_json(archive.load_state(0)["vocabulary"])
  if len(vocab) == 0:
    logging.warning("The seed annotations name no skill: every skill-set will be empty.")
  annotator = roles.annotator.with_vocabulary(vocab)
  stats = sparq_metrics.ArchiveStats.from_json(saved["stats"])
  counter = skills_lib.SkillCounter.from_json(saved["skill_counter"])
  items = {it.id: it for it in archive.iter_items()}
  times = dict(saved.get("times", {}))
  key = jax.random.PRNGKey(sc.seed)
  for r in range(archive.rounds_committed(), sc.rounds + 1):
    t_round = time.perf_counter()
    rng = np.random.default_rng([sc.seed, r])
    parent_ids = strategy.select(state, rng, sc.parents_per_round)
    parents = [(items[i].question, (items[i].successful_solutions or (None,))[0])
               for i in parent_ids]
    t0 = time.perf_counter()
    children = roles.generator.mutate(parents, jax.random.fold_in(key, 2 * r))
    t_gen = time.perf_counter() - t0
    readable = [i for i, c in enumerate(children) if not c.error]
    t0 = time.perf_counter()
    solutions = roles.student.solve([children[i].question for i in readable], sc.k,
                                    jax.random.fold_in(key, 2 * r + 1))
    t_solve = time.perf_counter() - t0
    raw_skills = annotator.annotate([children[i].question for i in readable],
                                    [children[i].solution for i in readable])
    sets, counter = skills_lib.skill_sets_of(vocab, raw_skills, k=sc.max_skills_per_problem,
                                             counter=counter)
    verdicts = {i: (sol, st) for i, sol, st in zip(readable, solutions, sets)}
    new, next_id = [], archive.next_id()
    for i, (pid, child) in enumerate(zip(parent_ids, children)):
      common = dict(id=next_id + i, parent_id=pid, round=r, strategy=sc.strategy,
                    question=child.question, intended_answer=child.intended_answer,
                    raw_output=child.raw_output, parse_error=child.error)
      if i not in verdicts:
        new.append(ArchiveItem(**common))
        continue
      sols, skill_set = verdicts[i]
      v = quality_lib.verify(sols, child.intended_answer, sc.t_low, sc.t_high)
      valid = roles.validity(child.question, child.intended_answer) if roles.validity else None
      new.append(ArchiveItem(**common, k=v.k, num_correct=v.num_correct,
                             solve_rate=v.solve_rate, quality=v.quality, skill_set=skill_set,
                             successful_solutions=v.successful_solutions, valid=valid))
    state = strategy.update(state, new)
    row, stats = sparq_metrics.round_and_cumulative(stats, new)
    items.update((it.id, it) for it in new)
    t_total = time.perf_counter() - t_round
    round_times = {"generator_s": t_gen, "student_s": t_solve,
                   "host_s": t_total - t_gen - t_solve, "round_s": t_total}
    times = {k: times.get(k, 0.0) + v for k, v in round_times.items()}
    # Metrics first, then the commit: a kill in between re-runs the round, and the logger
    # drops rows of uncommitted rounds on restart, so each round is logged exactly once.
    if logger is not None:
      row.update(round_times)
      row["rollouts_per_s"] = len(readable) * sc.k / max(t_solve, 1e-9)
      row["sampler_share"] = (t_gen + t_solve) / max(t_total, 1e-9)
      row["host_share"] = round_times["host_s"] / max(t_total, 1e-9)
      row["unknown_skill_annotations"] = counter.num_with_unknown
      logger.write(r, {k: v for k, v in row.items() if isinstance(v, (int, float))})
    archive.commit_round(r, new, {"strategy_state": state.to_json(),
                                  "stats": stats.to_json(),
                                  "skill_counter": counter.to_json(), "times": times})
  logging.info("SPARQ phase 1 done: %d rounds, %d items", sc.rounds, len(items))
  return [items[i] for i in sorted(items)]
