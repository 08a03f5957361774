"""Real math datasets: GSM8K, MATH, SVAMP and AIME from files.

Nothing is downloaded: every loader reads a JSONL or Parquet file (or a glob of
shards), local or ``gs://`` (through ``qdc_jax.storage``), whose path comes from
a flag (the caller names it, e.g. ``--config.task.train_path``). Each row is
validated; a bad row raises ``ValueError`` naming the file, the line (JSONL,
1-based) or row index (Parquet, 0-based), the field, and the flag to fix.
All datasets become one type, ``MathExample``, which then feeds:

  * SFT records: ``to_record(ex)`` -> {'prompt', 'completion'} (the lab's
    prompt template; the solution ends in ``The answer is X.``);
  * grain: ``grain_source(name, path)``, a random-access source of
    {'prompt', 'completion', 'answer'} records that ``pipeline.lm_dataset``
    and ``grain.MapDataset.source`` both accept;
  * seqio: ``register_seqio_tasks({name: {split: path}})`` registers
    ``qdc_math_<name>`` tasks with an answer-accuracy metric;
  * TFDS: ``tfds_examples('gsm8k', split, data_dir)`` reads an already
    prepared TFDS copy (``download=False``). Only GSM8K has a TFDS builder
    (``gsm8k``); TFDS's ``math_dataset`` is DeepMind's Mathematics dataset,
    not Hendrycks' MATH, and there is none for SVAMP or AIME.

Row formats (extra fields are ignored):
  gsm8k: question (str), answer (str: steps with ``<<48/2=24>>`` calculator
         annotations, last line ``#### 72``).
  math:  problem, solution (str, answer in the last ``\\boxed{}``), level
         ("Level 1".."Level 5", "Level ?", or int 1..5), type (or subject).
  svamp: Body + Question (or body/question, or question_concat), Answer
         (number), optional ID, Equation, Type.
  aime:  problem (or question), answer (int or str), optional solution,
         year, id.

Importing this module registers the four loaders in ``qdc_jax.registry``
under kind "dataset". TensorFlow, seqio, TFDS, grain and pyarrow are imported
only by the functions that need them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import numbers
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from qdc_jax import registry
from qdc_jax import storage
from qdc_jax.data import answers
from qdc_jax.data import arith

DATASETS = ("gsm8k", "math", "svamp", "aime")
DISPLAY_NAMES = {"gsm8k": "GSM8K", "math": "MATH", "svamp": "SVAMP", "aime": "AIME"}
# The lab's templates, so lab and real data read alike to a model.
DEFAULT_PROMPT_TEMPLATE = arith.PROMPT_TEMPLATE
ANSWER_TEMPLATE = arith.ANSWER_TEMPLATE
TASK_PREFIX = "qdc_math_"
# Datasets with a TFDS builder, by our name. Absent names have none.
TFDS_BUILDERS = {"gsm8k": "gsm8k"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = "*?["
_CALC_RE = re.compile(r"<<([^<>]*)>>")
_LEVEL_RE = re.compile(r"Level ([1-5?])")


@dataclasses.dataclass(frozen=True)
class MathExample:
  """One problem of any dataset.

  Attributes:
    question: The problem text shown to the model.
    answer: The reference final answer as a string ("72", "\\frac{1}{2}").
    solution: Worked solution text, without GSM8K calculator annotations or
      ``####`` line; None when the dataset has no solutions.
    meta: Dataset-specific extras ("dataset" always; e.g. "level", "type",
      "calculator_ops", "raw_answer", "id", "year", "equation").
  """

  question: str
  answer: str
  solution: Optional[str] = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Text helpers.


def _template_parts(template: str) -> list[str]:
  """Literal pieces of ``template`` around its ``{question}`` fields."""
  sentinel = "\x00"
  try:
    filled = template.format(question=sentinel)
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"Prompt template {template!r} must have only {{question}} fields "
                     f"(write literal braces as {{{{ }}}}): {e!r}") from None
  parts = filled.split(sentinel)
  if len(parts) < 2:
    raise ValueError(f"Prompt template {template!r} has no {{question}} field.")
  return parts


def format_prompt(template: str, question: str) -> str:
  """``template`` with every ``{question}`` replaced (``str.format`` rules)."""
  return question.join(_template_parts(template))


def answer_line(answer: str) -> str:
  """The final-answer line, ``The answer is X.``"""
  return ANSWER_TEMPLATE.format(answer=answer)


def to_record(ex: MathExample, template: str = DEFAULT_PROMPT_TEMPLATE, *,
              with_answer_line: bool = True) -> dict[str, str]:
  """An SFT record {'prompt', 'completion'} of one example.

  Args:
    ex: The example.
    template: Prompt template with a ``{question}`` field.
    with_answer_line: End the completion with ``The answer is X.`` (not added
      twice when the solution already ends with it). Otherwise the completion
      is the raw solution (the answer line when there is no solution).

  Returns:
    {'prompt': str, 'completion': str}.
  """
  line = answer_line(ex.answer)
  solution = (ex.solution or "").rstrip()
  if not with_answer_line and ex.solution is not None:
    completion = ex.solution
  elif not solution:
    completion = line
  elif solution.splitlines()[-1].strip() == line:
    completion = solution
  else:
    completion = f"{solution}\n{line}"
  return {"prompt": format_prompt(template, ex.question), "completion": completion}


def strip_calculator_annotations(text: str) -> str:
  """GSM8K text without its ``<<expr=result>>`` annotations."""
  return _CALC_RE.sub("", text)


def calculator_ops(text: str) -> list[tuple[str, str]]:
  """The (expression, result) of each ``<<expr=result>>`` annotation, in order.

  The result is what follows the last ``=``; an annotation without ``=`` is
  skipped.
  """
  ops = []
  for m in _CALC_RE.finditer(text):
    expr, sep, result = m[1].rpartition("=")
    if sep:
      ops.append((expr.strip(), result.strip()))
  return ops


def gsm8k_final_answer(text: str) -> Optional[str]:
  """The answer after the last ``####`` (rest of that line), commas removed."""
  i = text.rfind("####")
  if i < 0:
    return None
  value = text[i + 4:].split("\n", 1)[0].strip().replace(",", "")
  return value or None


def _number_text(x: Any) -> str:
  """'27' for 27 and 27.0; '0.5' for 0.5."""
  if isinstance(x, numbers.Integral):
    return str(int(x))
  value = float(x)
  if value.is_integer() and abs(value) < 2**53:
    return str(int(value))
  return repr(value)


# ---------------------------------------------------------------------------
# Reading and validating rows.


class _Row:
  """One row of a file, with where it came from, for error messages."""

  def __init__(self, data: Mapping[str, Any], where: str, name: str, flag: str):
    self.data, self.where, self.name, self.flag = data, where, name, flag

  def error(self, message: str) -> ValueError:
    return ValueError(
        f"{self.where}: {message}. Fix the file, or point {self.flag} at a "
        f"{DISPLAY_NAMES[self.name]} file.")

  def has(self, key: str) -> bool:
    return self.data.get(key) is not None

  def get(self, keys: Sequence[str], types: tuple[type, ...], expected: str, *,
          required: bool = True) -> Any:
    """The first present field of ``keys``, checked against ``types``.

    A null value counts as missing (Parquet fills absent columns with null).
    bools are never numbers.
    """
    for key in keys:
      if self.has(key):
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, types):
          shown = repr(value)
          shown = shown if len(shown) <= 40 else shown[:37] + "..."
          raise self.error(f"field {key!r} must be {expected}, got "
                           f"{type(value).__name__} {shown}")
        return value
    if not required:
      return None
    want = " or ".join(repr(k) for k in keys)
    raise self.error(f"missing field {want} (fields: {sorted(self.data)})")


_NO_FLAG = "the path flag"  # what errors say when the caller names no flag


def _expand(path: str, name: str, flag: str = _NO_FLAG) -> list[str]:
  if not path:
    raise FileNotFoundError(f"No {DISPLAY_NAMES[name]} file given: set {flag}")
  if any(c in path for c in _GLOB_CHARS):
    files = storage.glob(path)
    if not files:
      raise FileNotFoundError(f"No {DISPLAY_NAMES[name]} files match {path} (set {flag})")
    return files
  if not storage.is_file(path):
    raise FileNotFoundError(f"No such {DISPLAY_NAMES[name]} file: {path} (set {flag})")
  return [path]


def _jsonl_rows(path: str, name: str, flag: str) -> Iterator[_Row]:
  with storage.path(path).open("r", encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{i}"
      try:
        data = json.loads(line)
      except json.JSONDecodeError as e:
        raise _Row({}, where, name, flag).error(f"not valid JSON ({e.msg})") from None
      if not isinstance(data, dict):
        raise _Row({}, where, name, flag).error(
            f"expected a JSON object, got {type(data).__name__}")
      yield _Row(data, where, name, flag)


def _parquet_rows(path: str, name: str, flag: str) -> Iterator[_Row]:
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    with storage.path(path).open("rb") as fh:
      table = pq.read_table(fh)
  except pyarrow.ArrowInvalid as e:
    raise ValueError(f"{path}: not a readable Parquet file ({e}); point {flag} at a "
                     f"{DISPLAY_NAMES[name]} file.") from None
  for i, data in enumerate(table.to_pylist()):
    yield _Row(data, f"{path}: row {i}", name, flag)


def _rows(path: str, name: str, flag: str = _NO_FLAG) -> Iterator[_Row]:
  for file in _expand(os.fspath(path), name, flag):
    if file.lower().endswith(_PARQUET_SUFFIXES):
      yield from _parquet_rows(file, name, flag)
    else:
      yield from _jsonl_rows(file, name, flag)


# ---------------------------------------------------------------------------
# Per-dataset row parsers.


def _parse_gsm8k(row: _Row) -> MathExample:
  question = row.get(("question",), (str,), "a string")
  raw = row.get(("answer",), (str,), "a string (steps, then '#### <answer>')")
  final = gsm8k_final_answer(raw)
  if final is None:
    raise row.error("field 'answer' has no final '#### <answer>' line")
  steps = raw[:raw.rfind("####")]
  solution = strip_calculator_annotations(steps).rstrip()
  meta = {"dataset": "gsm8k", "calculator_ops": calculator_ops(raw), "raw_answer": raw}
  return MathExample(question.strip(), final, solution, meta)


def _parse_math(row: _Row) -> MathExample:
  problem = row.get(("problem",), (str,), "a string")
  solution = row.get(("solution",), (str,), "a string")
  level_value = row.get(("level",), (str, int), "'Level 1'..'Level 5' or 'Level ?'")
  if isinstance(level_value, int):
    if not 1 <= level_value <= 5:
      raise row.error(f"field 'level' must be in 1..5, got {level_value}")
    level = level_value
  else:
    m = _LEVEL_RE.fullmatch(level_value.strip())
    if m is None:
      raise row.error(f"field 'level' must be 'Level 1'..'Level 5' or 'Level ?', got "
                      f"{level_value!r}")
    level = None if m[1] == "?" else int(m[1])
  subject = row.get(("type", "subject"), (str,), "a string")
  answer = answers.extract_answer(solution)
  if answer is None:
    answer = row.get(("answer",), (str,), "a string", required=False)
  if answer is None:
    raise row.error("field 'solution' has no \\boxed{...} final answer")
  meta = {"dataset": "math", "level": level, "type": subject}
  return MathExample(problem.strip(), answer, solution, meta)


def _parse_svamp(row: _Row) -> MathExample:
  has_parts = any(row.has(k) for k in ("Body", "body", "Question", "question"))
  if has_parts or not row.has("question_concat"):
    body = row.get(("Body", "body"), (str,), "a string")
    question = row.get(("Question", "question"), (str,), "a string")
    text = f"{body.strip()} {question.strip()}".strip()
  else:
    text = row.get(("question_concat",), (str,), "a string").strip()
  value = row.get(("Answer", "answer"), (int, float, str), "a number")
  if isinstance(value, str):
    if answers.normalize_number(value) is None:
      key = "Answer" if row.has("Answer") else "answer"
      raise row.error(f"field {key!r} must be a number, got str {value!r}")
    answer = value.strip()
  else:
    if not math.isfinite(value):
      key = "Answer" if row.has("Answer") else "answer"
      raise row.error(f"field {key!r} must be a finite number, got {value!r}")
    answer = _number_text(value)
  meta = {"dataset": "svamp"}
  for key in ("ID", "Equation", "Type"):
    value = row.get((key, key.lower()), (str, int, float), "a string or number",
                    required=False)
    if value is not None:
      meta[key.lower()] = value
  return MathExample(text, answer, None, meta)


def _parse_aime(row: _Row) -> MathExample:
  problem = row.get(("problem", "question"), (str,), "a string")
  value = row.get(("answer",), (int, str), "an int or string")
  answer = str(value).strip()
  if not answer:
    raise row.error("field 'answer' is empty")
  solution = row.get(("solution",), (str,), "a string", required=False)
  meta = {"dataset": "aime"}
  for key in ("year", "id"):
    value = row.get((key,), (int, str), "an int or string", required=False)
    if value is not None:
      meta[key] = value
  return MathExample(problem.strip(), answer, solution, meta)


_PARSERS: dict[str, Callable[[_Row], MathExample]] = {
    "gsm8k": _parse_gsm8k, "math": _parse_math, "svamp": _parse_svamp, "aime": _parse_aime,
}


def _check_name(name: str) -> str:
  key = name.lower()
  if key not in _PARSERS:
    raise ValueError(f"Unknown math dataset {name!r}; valid: {', '.join(DATASETS)}")
  return key


def load(name: str, path: str, *, flag: Optional[str] = None) -> list[MathExample]:
  """Every example of a JSONL/Parquet file (or glob of shards), local or gs://.

  Args:
    name: 'gsm8k', 'math', 'svamp' or 'aime'.
    path: File path; ``.parquet``/``.pq`` files are read with pyarrow,
      anything else as JSONL. Glob patterns read all matches in sorted order.
    flag: the flag that set ``path`` (e.g. '--config.task.train_path'), named by errors.

  Returns:
    The examples in file order.

  Raises:
    FileNotFoundError: no such file (naming the path and the flag).
    ValueError: unknown name, or a row with a missing or mistyped field
      (naming file, line or row, field, and the flag).
  """
  key = _check_name(name)
  return [_PARSERS[key](row) for row in _rows(path, key, flag or _NO_FLAG)]


def load_gsm8k(path: str) -> list[MathExample]:
  """GSM8K examples from ``path``; see ``load``."""
  return load("gsm8k", path)


def load_math(path: str) -> list[MathExample]:
  """MATH examples from ``path``; see ``load``."""
  return load("math", path)


def load_svamp(path: str) -> list[MathExample]:
  """SVAMP examples from ``path``; see ``load``."""
  return load("svamp", path)


def load_aime(path: str) -> list[MathExample]:
  """AIME examples from ``path``; see ``load``."""
  return load("aime", path)


LOADERS: dict[str, Callable[[str], list[MathExample]]] = {
    "gsm8k": load_gsm8k, "math": load_math, "svamp": load_svamp, "aime": load_aime,
}


# ---------------------------------------------------------------------------
# grain.


class MathRecordSource(collections.abc.Sequence):
  """Random-access {'prompt', 'completion', 'answer'} records of examples.

  A plain sequence (``__len__``/``__getitem__``), so it serves as
  ``pipeline.lm_dataset(records=...)`` and as ``grain.MapDataset.source(...)``.
  """

  def __init__(self, examples: Sequence[MathExample],
               template: str = DEFAULT_PROMPT_TEMPLATE, *, with_answer_line: bool = True):
    _template_parts(template)  # Fails now, not at the first read.
    self._examples = tuple(examples)
    self._template = template
    self._with_answer_line = with_answer_line

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, str]:
    if isinstance(index, slice):
      raise TypeError("MathRecordSource takes integer indices")
    ex = self._examples[index]
    rec = to_record(ex, self._template, with_answer_line=self._with_answer_line)
    rec["answer"] = ex.answer
    return rec

  def __repr__(self) -> str:
    return f"MathRecordSource({len(self)} examples)"


def grain_source(name: str, path: str, template: str = DEFAULT_PROMPT_TEMPLATE, *,
                 with_answer_line: bool = True) -> MathRecordSource:
  """The records of ``load(name, path)`` as a random-access grain source."""
  return MathRecordSource(load(name, path), template, with_answer_line=with_answer_line)


def grain_dataset(name: str, path: str, template: str = DEFAULT_PROMPT_TEMPLATE, *,
                  with_answer_line: bool = True):
  """``grain.MapDataset.source`` over ``grain_source(name, path)``."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.MapDataset.source(
      grain_source(name, path, template, with_answer_line=with_answer_line))


# ---------------------------------------------------------------------------
# seqio.


def _as_text(x: Any) -> Any:
  return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else x


def answer_accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """seqio metric: fraction of predictions whose final answer equals the target's.

  Correctness is ``answers.is_correct(prediction, target)``: the prediction's
  answer is extracted (no answer format means wrong); the target may be a full
  reference completion (its answer is extracted) or a bare answer.
  """
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not targets:
    return {"accuracy": 0.0, "num_examples": 0}
  correct = sum(answers.is_correct(_as_text(p), _as_text(t))
                for t, p in zip(targets, predictions))
  return {"accuracy": correct / len(targets), "num_examples": len(targets)}


def task_name(name: str) -> str:
  """The seqio task name of a dataset, e.g. 'qdc_math_gsm8k'."""
  return TASK_PREFIX + _check_name(name)


def _dataset_fn(name: str, split_paths: Mapping[str, str], with_answer_line: bool):
  """A seqio ``DatasetFnCallable`` of {'question', 'targets', 'answer'} strings."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    examples = load(name, split_paths[split])
    # The prompt is formatted by the task's first preprocessor; the target is
    # the completion of to_record.
    columns = {"question": [], "targets": [], "answer": []}
    for ex in examples:
      columns["question"].append(ex.question)
      columns["targets"].append(
          to_record(ex, "{question}", with_answer_line=with_answer_line)["completion"])
      columns["answer"].append(ex.answer)
    ds = tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, dtype=tf.string, shape=[len(v)]) for k, v in columns.items()})
    if shuffle_files and examples:
      ds = ds.shuffle(len(examples), seed=seed)
    return ds

  return dataset_fn


def make_format_prompt(template: str = DEFAULT_PROMPT_TEMPLATE):
  """A seqio preprocessor setting 'inputs' to ``template`` filled with 'question'."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  parts = _template_parts(template)

  def format_prompt_preprocessor(dataset):
    def fn(ex):
      pieces = [parts[0]]
      for part in parts[1:]:
        pieces += [ex["question"], part]
      return {**ex, "inputs": tf.strings.join(pieces)}
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return format_prompt_preprocessor


def register_seqio_tasks(paths: Mapping[str, Mapping[str, str]], vocabulary: Any = None, *,
                         template: str = DEFAULT_PROMPT_TEMPLATE,
                         with_answer_line: bool = True) -> list[str]:
  """Registers one seqio Task per dataset, replacing earlier ones of that name.

  Each task ``qdc_math_<name>`` reads ``load(name, paths[name][split])`` and
  yields 'inputs' (the prompt), 'targets' (the completion of ``to_record``),
  plus the raw 'question' and 'answer' strings. Its metric is
  ``answer_accuracy``.

  Args:
    paths: {dataset name: {split: file path}}, e.g.
      {'gsm8k': {'train': '/d/train.jsonl', 'test': '/d/test.jsonl'}}.
    vocabulary: None keeps 'inputs'/'targets' as strings; a
      ``seqio.Vocabulary`` (or a SentencePiece model path) tokenizes them,
      then appends EOS to 'targets'.
    template: Prompt template with a ``{question}`` field.
    with_answer_line: See ``to_record``.

  Returns:
    The registered task names.

  Raises:
    FileNotFoundError: a path does not exist (checked now, read lazily).
    ValueError: unknown dataset name, empty splits, or a bad template.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  _template_parts(template)
  if isinstance(vocabulary, (str, os.PathLike)):
    vocabulary = seqio.SentencePieceVocabulary(os.fspath(vocabulary))
  if vocabulary is None:
    text = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                         dtype=tf.string, rank=0)
    output_features = {"inputs": text, "targets": text}
    preprocessors = [make_format_prompt(template)]
  else:
    output_features = {
        "inputs": seqio.Feature(vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    preprocessors = [make_format_prompt(template), seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos]
  names = []
  for name, split_paths in paths.items():
    key = _check_name(name)
    if not split_paths:
      raise ValueError(f"No splits given for {name!r}; pass {{split: path}}.")
    for path in split_paths.values():
      _expand(os.fspath(path), key)
    split_paths = {s: os.fspath(p) for s, p in split_paths.items()}
    source = seqio.FunctionDataSource(
        _dataset_fn(key, split_paths, with_answer_line), splits=list(split_paths))
    full_name = task_name(key)
    seqio.TaskRegistry.remove(full_name)
    seqio.TaskRegistry.add(full_name, source=source, output_features=output_features,
                           preprocessors=preprocessors, metric_fns=[answer_accuracy])
    names.append(full_name)
  return names


# ---------------------------------------------------------------------------
# TFDS.


def tfds_examples(name: str, split: str = "test",
                  data_dir: Optional[str] = None) -> list[MathExample]:
  """Examples from an already prepared TFDS copy (never downloads).

  Only datasets in ``TFDS_BUILDERS`` have a builder (GSM8K: splits train,
  test, train_socratic, test_socratic).

  Raises:
    ValueError: no TFDS builder for this dataset.
    FileNotFoundError: ``data_dir`` does not hold the prepared dataset.
  """
  key = _check_name(name)
  builder = TFDS_BUILDERS.get(key)
  if builder is None:
    raise ValueError(
        f"{DISPLAY_NAMES[key]} has no TFDS builder (TFDS has: "
        f"{', '.join(sorted(TFDS_BUILDERS))}); read a JSONL/Parquet file of it instead "
        f"(math_tasks.load).")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.load(builder, split=split, data_dir=data_dir, download=False)
  except AssertionError as e:
    raise FileNotFoundError(
        f"TFDS dataset {builder!r} (split {split!r}) is not prepared in data_dir "
        f"{data_dir or '~/tensorflow_datasets'}; nothing is downloaded here. Prepare it "
        f"elsewhere and copy it there, or read a JSONL/Parquet file of it "
        f"(math_tasks.load). ({e})") from None
  out = []
  for i, ex in enumerate(tfds.as_numpy(ds)):
    data = {k: _as_text(v) for k, v in ex.items()}
    out.append(_PARSERS[key](_Row(data, f"tfds:{builder}/{split}[{i}]", key, "data_dir")))
  return out


# ---------------------------------------------------------------------------
# Registry: a module reload must not register twice.

for _name, _loader in LOADERS.items():
  if _name not in registry.names("dataset"):
    registry.register("dataset", _name, _loader)
