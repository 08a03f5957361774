"""What the RL workloads (SFT, EI, PPO, RCRL) share: the task, the policy, evaluation, export.

A task is three lists of `Item`s (train questions the policy explores on, validation questions
that decide saturation / the best checkpoint, and named test splits for the final tables).
On the lab (the default) they are oracle-checked arithmetic problems: train/val from the
student's training distribution with fresh seeds, test = the fixed in-distribution and OOD
test problems that no workload ever trains on. With a real dataset they come from files
(`math_tasks.load`), paths from flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import ml_collections

from qdc_jax import fit
from qdc_jax import model_io
from qdc_jax import sampling
from qdc_jax import storage
from qdc_jax.data import arith
from qdc_jax.data import lab_tasks
from qdc_jax.eval import solve
from qdc_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class Item:
  question: str
  prompt: str  # what the model is shown
  answer: str  # reference final answer
  solution: str = ""  # reference solution ending in the answer line ("" when unknown)


@dataclasses.dataclass
class Task:
  train: list[Item]
  val: list[Item]
  test: dict[str, list[Item]]


def task_section(name: str = "lab") -> ml_collections.ConfigDict:
  """`config.task`: which questions RL explores on, validates and tests on."""
  c = ml_collections.ConfigDict()
  c.name = name  # 'lab' | 'gsm8k' | 'math' | 'svamp' (real datasets read from the paths)
  c.train_path = ""  # real datasets: JSONL/Parquet of training questions
  c.val_path = ""  # real datasets: validation file ('' = hold out val_size of train)
  c.test_path = ""  # real datasets: test file ('' = no test split)
  c.seed = 1  # lab: which training questions (the shipped student trained on seed 0)
  c.train_size = 512  # questions explored on (0 = all, real datasets)
  c.val_size = 128  # validation questions
  c.test_size = 128  # test questions per split (0 = all, real datasets)
  c.bridge_fraction = 0.1  # lab: share of longer questions, as in the student's training
  c.prompt_template = arith.PROMPT_TEMPLATE  # real datasets; must contain {question}
  return c


def _lab_item(p: arith.Problem) -> Item:
  rec = p.to_record()
  return Item(question=p.text, prompt=rec["prompt"], answer=str(p.answer),
              solution=rec["completion"])


def check_task(c: ml_collections.ConfigDict) -> None:
  """Fail before anything loads when a real dataset has no training file."""
  if c.name != "lab" and not c.train_path:
    raise ValueError(f"task.name={c.name!r} needs --config.task.train_path (a JSONL or "
                     f"Parquet file of {c.name} rows)")


def load_task(c: ml_collections.ConfigDict) -> Task:
  if c.name == "lab":
    test = {s: lab_tasks.test_problems(s, c.test_size) for s in ("in_dist", "ood")}
    exclude = test["in_dist"] + test["ood"]
    val = lab_tasks.without(arith.make_split("in_dist", c.val_size, seed=c.seed + 1000),
                            exclude)
    train = lab_tasks.without(
        lab_tasks.student_problems(c.train_size, c.seed, c.bridge_fraction), exclude + val)
    return Task(train=[_lab_item(p) for p in train], val=[_lab_item(p) for p in val],
                test={s: [_lab_item(p) for p in ps] for s, ps in test.items()})
  from qdc_jax.data import math_tasks  # pylint: disable=g-import-not-at-top
  check_task(c)

  def items(key):  # key: the task field with the path, which errors name as the flag
    examples = math_tasks.load(c.name, c[key], flag=f"--config.task.{key}")
    return [Item(question=e.question,
                 prompt=math_tasks.format_prompt(c.prompt_template, e.question),
                 answer=e.answer, solution=math_tasks.to_record(e)["completion"]
                 if e.solution else "") for e in examples]

  train = items("train_path")
  if not c.val_path and c.val_size <= 0:
    raise ValueError("task.val_size must be > 0 when no task.val_path is given: validation "
                     "questions are held out of the train file")
  if c.val_path:
    val = items("val_path")[:c.val_size or None]
  else:
    if len(train) <= c.val_size:
      raise ValueError(f"{c.train_path} has {len(train)} rows, not more than task.val_size="
                       f"{c.val_size}: give --config.task.val_path or lower val_size")
    train, val = train[:-c.val_size], train[-c.val_size:]
  test = {c.name: items("test_path")[:c.test_size or None]} if c.test_path else {}
  return Task(train=train[:c.train_size or None], val=val, test=test)


def sft_records(items: Sequence[Item]) -> list[dict]:
  """{'prompt', 'completion'} records of the reference solutions (items without one skipped)."""
  return [{"prompt": it.prompt, "completion": it.solution} for it in items if it.solution]


# ---------------------------------------------------------------------------------------------
# The policy: a model directory (qdc_jax.model_io), e.g. the shipped student.


@dataclasses.dataclass
class Policy:
  model: transformer.Transformer
  params: Any
  tokenizer: Any
  shardings: Any
  meta: dict
  path: str


def resolve_model_dir(path: str) -> str:
  """'asset:NAME' -> the shipped asset directory; other paths unchanged."""
  return model_io.asset_path(path[len("asset:"):]) if path.startswith("asset:") else path


def load_policy(path: str, *, mesh, rules) -> Policy:
  directory = resolve_model_dir(path)
  if not storage.exists(storage.join(directory, "model.json")):
    raise FileNotFoundError(f"{path}: no model.json there; give a model directory written by "
                            f"qdc_jax.model_io (e.g. <workdir>/model of an lm/sft run) or "
                            f"'asset:lab_student'")
  cfg, params, tok, meta, shardings = model_io.load_model(directory, mesh=mesh, rules=rules)
  if tok is None:
    raise ValueError(f"{directory}/model.json names no tokenizer")
  return Policy(transformer.Transformer(cfg), params, tok, shardings, meta, directory)


def export(directory: str, policy: Policy, params: Any, notes: Optional[dict] = None) -> None:
  """Write `params` as a model directory with the policy's config and tokenizer."""
  model_io.save_model(directory, policy.model.config, params,
                      tokenizer=policy.meta.get("tokenizer"), notes=notes or {})


# ---------------------------------------------------------------------------------------------
# Evaluation: maj@1 (greedy), maj@K, pass@K and solution diversity.


def eval_section(k: int = 16) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.k = k  # samples per question (the thesis: 96)
  c.temperature = 0.7  # test-time sampling temperature (greedy for maj@1)
  c.max_new_tokens = 160
  c.ks = (1, 4, k)  # pass@k / maj@k budgets
  c.batch_size = 64  # questions per sampler call (x k rows)
  c.seed = 0
  # Texts that end a sample (base models: e.g. ("\nQuestion:",)); chat models stop at
  # <end_of_turn> anyway.
  c.stop_strings = ()
  # A reward-model directory (e.g. <glore workdir>/orm/model): the samples are also reranked
  # by it (rerank@k beside maj@k and pass@k). '' = none.
  c.reward_model = ""
  return c


def evaluate(params, items: Sequence[Item], *, policy: Policy, ec, mesh, rules,
             param_shardings=None, scorer=None) -> tuple[dict, dict]:
  """`solve.solve_and_score` on `items`: metrics (greedy_accuracy = maj@1, maj@k, pass@k,
  diversity/..., rerank@k with a reward model: `scorer(prompts, texts)`, else the one
  `ec.reward_model` names) and the completions."""
  if scorer is None and ec.get("reward_model"):
    scorer = _reward_model(ec.reward_model, mesh, rules).final_scores
  return solve.solve_and_score(
      params, [it.prompt for it in items], [it.answer for it in items], model=policy.model,
      tokenizer=policy.tokenizer, k=ec.k, temperature=ec.temperature,
      max_new_tokens=ec.max_new_tokens, ks=tuple(k for k in ec.ks if k <= ec.k),
      rng=jax.random.PRNGKey(ec.seed), batch_size=ec.batch_size, mesh=mesh, rules=rules,
      param_shardings=param_shardings or policy.shardings,
      stop_strings=tuple(ec.get("stop_strings", ())), scorer=scorer)


@functools.lru_cache(maxsize=2)
def _reward_model(path: str, mesh, rules):
  """The evaluation's reward model, loaded once per (path, mesh) in a process."""
  from qdc_jax.rl import reward_models  # pylint: disable=g-import-not-at-top
  return reward_models.load(path, mesh=mesh, rules=rules)


def headline(m: dict, k: int) -> dict:
  """The thesis table columns of one `evaluate` result (maj@1 is the greedy accuracy)."""
  out = {"maj@1": m.get("greedy_accuracy"), f"maj@{k}": m.get(f"maj@{k}"),
         f"pass@{k}": m.get(f"pass@{k}"), "sample_accuracy": m.get("accuracy")}
  if f"rerank@{k}" in m:
    out[f"rerank@{k}"] = m[f"rerank@{k}"]
  for key in ("exact_all", "trace_all", "exact_correct", "trace_correct"):
    out[f"diversity/{key}"] = m.get(f"diversity/{key}")
  return out


# Every RL experiment writes <workdir>/rl_report.json (docs/results.md is built from these):
# {"algorithm": "sft" | "ei" | "ppo" | "rcrl", "variant": str, "seed": int, "k": int,
#  "curve": [{"round": int, "rollouts": int, **headline(validation metrics)}, ...],
#  "final": {split: headline(test metrics) for each test split}, "notes": {...}}
REPORT_FILE = "rl_report.json"


# ---------------------------------------------------------------------------------------------
# SFT hyper-parameters (shared by SFT, EI's re-fits from the base and RCRL).


def sft_train_section(preset: str = "lab") -> ml_collections.ConfigDict:
  """`config.train` for fine-tuning a policy (qdc_jax.fit knobs plus `epochs`)."""
  c = fit.default_train_config()
  c.epochs = 0.0  # > 0: steps = ceil(epochs x records / batch_size) (overrides steps)
  if preset == "lab":
    # Fine-tuning the shipped student (trained at lr 3e-3 from scratch): a tenth of it.
    c.steps, c.batch_size, c.seq_len, c.pack = 200, 16, 256, True
    c.opt.lr, c.opt.warmup_steps, c.opt.final_lr_ratio = 3e-4, 20, 0.01
    c.log_every, c.save_every = 25, 100
  elif preset == "gemma":
    # Thesis SFT / EI: 4 epochs, global batch 128, lr 2e-5 cosine-decayed to 2e-7.
    c.epochs, c.batch_size, c.seq_len, c.pack = 4.0, 128, 512, False
    c.opt.lr, c.opt.warmup_steps, c.opt.final_lr_ratio = 2e-5, 50, 0.01
    c.opt.weight_decay = 0.0
    c.log_every, c.save_every = 10, 200
  elif preset == "smoke":
    c.steps, c.batch_size, c.seq_len, c.pack = 4, 8, 128, False
    c.opt.lr, c.opt.warmup_steps = 1e-3, 1
    c.log_every, c.save_every = 2, 2
  else:
    raise ValueError(f"Unknown SFT preset {preset!r}; choose 'lab', 'gemma' or 'smoke'")
  return c


def resolve_train(tc: ml_collections.ConfigDict, num_records: int) -> ml_collections.ConfigDict:
  """A copy of `tc` with `steps` from `epochs` when epochs > 0 (the cosine follows it)."""
  out = ml_collections.ConfigDict(tc.to_dict())
  if tc.get("epochs", 0) and tc.epochs > 0:
    out.steps = max(1, math.ceil(tc.epochs * num_records / tc.batch_size))
  return out


def finished_report(workdir: str, filename: str = REPORT_FILE) -> Optional[dict]:
  """The report a finished run left in `workdir` (re-running it does nothing new), or None."""
  path = storage.join(workdir, filename)
  done = storage.read_json(path)
  if done is not None:
    logging.info("%s exists: this workdir is finished", path)
  return done


class ResultCache:
  """The results of a resumable experiment's stages, in one JSON file (e.g. glore_evals.json):
  each computed once, written as it lands (atomically; process 0 writes, as every
  `storage` write), read back on a resume, so a killed run redoes at most the stage it was in.
  Every process makes the same calls: a stage runs everywhere or nowhere."""

  def __init__(self, path: str):
    self.path = path
    self.values: dict = storage.read_json(path) or {}

  def __contains__(self, name: str) -> bool:
    return name in self.values

  def __getitem__(self, name: str):
    return self.values[name]

  def put(self, name: str, value) -> None:
    self.values[name] = value
    storage.write_json(self.path, self.values)

  def get(self, name: str, fn: Callable[[], Any],
          describe: Optional[Callable[[Any], Any]] = None):
    """The stored result `name`, or fn()'s, stored first (and logged: `describe(value)`, or
    the value itself / the length of a list)."""
    if name not in self.values:
      self.put(name, fn())
      value = self.values[name]
      shown = (describe(value) if describe else f"{len(value)} values"
               if isinstance(value, list) else value)
      logging.info("%s %s: %s", os.path.basename(self.path), name, shown)
    return self.values[name]

  def timed(self, name: str, done_marker: str, fn: Callable[[], Any]):
    """fn(), with its wall time stored under "seconds" the first time the stage really runs
    (`done_marker`, the file the stage leaves when complete, did not exist before and does
    after): a resumed run keeps the time of the run that did the work."""
    fresh = not storage.exists(done_marker)
    t0 = time.perf_counter()
    out = fn()
    if fresh and storage.exists(done_marker):
      self.values.setdefault("seconds", {})[name] = time.perf_counter() - t0
      storage.write_json(self.path, self.values)
    return out


def check_settings(workdir: str, settings: dict, *, may_change: Sequence[str] = (),
                   record: bool = True, filename: str = "settings.json") -> None:
  """Refuse to resume a workdir made with other settings, naming the keys that changed.

  `settings` is a nested JSON-able dict (e.g. `config.to_dict()`); keys in `may_change`
  (dotted paths, e.g. "ppo.stop_after_iteration") may differ. With `record`, a fresh
  workdir's settings are written (call it once the inputs have loaded, so a mistyped path
  does not pin the workdir). The sampler's version (`sampling.SAMPLER_VERSION`) is always
  part of the settings.
  """
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict):
        out.update(flat(v, key + "."))
      else:
        out[key] = json.loads(json.dumps(v, default=str))
    return out

  path = storage.join(workdir, filename)
  # What a key samples is part of the settings: a resume never mixes two samplers' draws.
  settings = {**settings, "sampler_version": sampling.SAMPLER_VERSION}
  now = {k: v for k, v in flat(settings).items()
         if not any(k == m or k.startswith(m + ".") for m in may_change)}
  before = storage.read_json(path)
  if before is None:
    if record:
      storage.makedirs(workdir)
      storage.write_json(path, now)
    return
  changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
  if changed:
    details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
    raise ValueError(f"{workdir} was made with other settings (changed: {', '.join(changed)}; "
                     f"{details}); resume with the settings it was made with, or use a fresh "
                     f"--workdir")
