"""Tests for the real-dataset layer: loaders, records, grain, seqio and TFDS."""

from __future__ import annotations

import json
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# pylint: disable-next=unused-import,g-bad-import-order
from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)

from qdc_jax import registry
from qdc_jax import tokenizers
from qdc_jax.data import math_tasks
from qdc_jax.data import pipeline

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
                 "as many clips in May. How many clips did she sell altogether?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"},
    {"question": "A shop sells 617 pens a day. How many in 2 days?",
     "answer": "It sells 617*2 = <<617*2=1234>>1,234 pens.\n#### 1,234"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{2}{4}$ in lowest terms?",
     "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$.", "level": "Level 2",
     "type": "Prealgebra"},
    {"problem": "Compute $1+1$.", "solution": "We have $1+1=\\boxed{2}$.",
     "level": "Level ?", "type": "Algebra"},
]
SVAMP_ROWS = [
    {"ID": "chal-1", "Body": "Jack had 8 pens.", "Question": "How many pens after 5 more?",
     "Equation": "( 8.0 + 5.0 )", "Answer": 13.0, "Type": "Addition"},
    {"body": "A pie is cut in 4.", "question": "What is one piece?", "answer": 0.25},
    {"question_concat": "Tom has 3 cars. How many after 2 more?", "Answer": 5},
]
AIME_ROWS = [
    {"id": 60, "problem": "Find the remainder of 2025 mod 1000.", "answer": 25, "year": 2025},
    {"question": "What is 7*11?", "answer": "077", "solution": "7*11=77, so \\boxed{077}."},
]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


@pytest.fixture(params=["jsonl", "parquet"])
def fmt(request):
  return request.param


def write(tmp_path, name, rows, fmt):
  path = tmp_path / f"{name}.{fmt}"
  return write_jsonl(path, rows) if fmt == "jsonl" else write_parquet(path, rows)


def test_gsm8k(tmp_path, fmt):
  exs = math_tasks.load("gsm8k", write(tmp_path, "gsm8k", GSM8K_ROWS, fmt))
  assert [e.answer for e in exs] == ["72", "1234"]
  assert exs[0].question == GSM8K_ROWS[0]["question"]
  assert exs[0].solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                             "Natalia sold 48+24 = 72 clips altogether.")
  assert exs[0].meta["calculator_ops"] == [("48/2", "24"), ("48+24", "72")]
  assert exs[1].meta["calculator_ops"] == [("617*2", "1234")]
  assert exs[0].meta["raw_answer"] == GSM8K_ROWS[0]["answer"]
  assert "<<" not in exs[1].solution and "####" not in exs[1].solution


def test_calculator_helpers():
  text = "a <<3*4=12>>12 b <<12-2=10>>10 c <<noeq>>"
  assert math_tasks.strip_calculator_annotations(text) == "a 12 b 10 c "
  assert math_tasks.calculator_ops(text) == [("3*4", "12"), ("12-2", "10")]
  assert math_tasks.gsm8k_final_answer("x\n#### 1,234,567\n") == "1234567"
  assert math_tasks.gsm8k_final_answer("no marker") is None


def test_math(tmp_path, fmt):
  exs = math_tasks.load("math", write(tmp_path, "math", MATH_ROWS, fmt))
  assert [e.answer for e in exs] == ["\\frac{1}{2}", "2"]
  assert exs[0].meta == {"dataset": "math", "level": 2, "type": "Prealgebra"}
  assert exs[1].meta["level"] is None
  assert exs[0].solution == MATH_ROWS[0]["solution"]


def test_svamp(tmp_path, fmt):
  if fmt == "parquet":  # One schema per Parquet file: one variant per file.
    exs = [math_tasks.load("svamp", write(tmp_path, f"svamp{i}", [r], fmt))[0]
           for i, r in enumerate(SVAMP_ROWS)]
  else:
    exs = math_tasks.load("svamp", write(tmp_path, "svamp", SVAMP_ROWS, fmt))
  assert [e.question for e in exs] == [
      "Jack had 8 pens. How many pens after 5 more?", "A pie is cut in 4. What is one piece?",
      "Tom has 3 cars. How many after 2 more?"]
  assert [e.answer for e in exs] == ["13", "0.25", "5"]
  assert exs[0].meta["equation"] == "( 8.0 + 5.0 )" and exs[0].meta["id"] == "chal-1"
  assert exs[0].solution is None


def test_aime(tmp_path):
  exs = math_tasks.load("aime", write_jsonl(tmp_path / "aime.jsonl", AIME_ROWS))
  assert [e.answer for e in exs] == ["25", "077"]
  assert exs[0].meta == {"dataset": "aime", "year": 2025, "id": 60}
  assert exs[1].question == "What is 7*11?" and exs[1].solution.startswith("7*11")


def test_glob_of_shards(tmp_path):
  write_parquet(tmp_path / "train-00000.parquet", GSM8K_ROWS[:1])
  write_parquet(tmp_path / "train-00001.parquet", GSM8K_ROWS[1:])
  exs = math_tasks.load_gsm8k(str(tmp_path / "train-*.parquet"))
  assert [e.answer for e in exs] == ["72", "1234"]


@pytest.mark.parametrize("name,rows,field,line", [
    ("gsm8k", [GSM8K_ROWS[0], {"question": "q?"}], "answer", 2),
    ("math", [{k: v for k, v in MATH_ROWS[0].items() if k != "level"}], "level", 1),
    ("svamp", [SVAMP_ROWS[0], {"Body": "b.", "Answer": 1}], "Question", 2),
    ("aime", [AIME_ROWS[0], AIME_ROWS[0], {"problem": "p"}], "answer", 3),
])
def test_missing_field_names_file_line_field(tmp_path, name, rows, field, line):
  path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
  with pytest.raises(ValueError) as e:
    math_tasks.load(name, path, flag="--config.task.train_path")
  msg = str(e.value)
  assert f"{path}:{line}:" in msg
  assert f"missing field '{field}'" in msg
  assert f"point --config.task.train_path at a {math_tasks.DISPLAY_NAMES[name]} file" in msg


def test_missing_field_parquet_names_row(tmp_path):
  path = write_parquet(tmp_path / "g.parquet", [GSM8K_ROWS[0], {"question": "q?", "answer": None}])
  with pytest.raises(ValueError, match=r"g\.parquet: row 1: missing field 'answer'"):
    math_tasks.load_gsm8k(path)


@pytest.mark.parametrize("name,row,field", [
    ("gsm8k", {"question": "q", "answer": 5}, "answer"),
    ("math", {**MATH_ROWS[0], "level": "Hard"}, "level"),
    ("math", {**MATH_ROWS[0], "problem": ["x"]}, "problem"),
    ("svamp", {**SVAMP_ROWS[0], "Answer": "many"}, "Answer"),
    ("svamp", {**SVAMP_ROWS[0], "Answer": True}, "Answer"),
    ("aime", {"problem": "p", "answer": 2.5}, "answer"),
])
def test_mistyped_field(tmp_path, name, row, field):
  path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
  with pytest.raises(ValueError, match=rf"{path}:1: field '{field}' must be"):
    math_tasks.load(name, path)


def test_gsm8k_without_final_line_and_math_without_box(tmp_path):
  path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no final"}])
  with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'answer' has no final '####"):
    math_tasks.load_gsm8k(path)
  path = write_jsonl(tmp_path / "m.jsonl", [{**MATH_ROWS[0], "solution": "It is 2"}])
  with pytest.raises(ValueError, match=r"m\.jsonl:1: .*boxed"):
    math_tasks.load_math(path)


def test_bad_json_and_missing_file(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n{oops\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
    math_tasks.load_gsm8k(str(path))
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError) as e:
    math_tasks.load("math", missing, flag="--config.data.seed_path")
  assert missing in str(e.value) and "(set --config.data.seed_path)" in str(e.value)
  with pytest.raises(ValueError, match="valid: gsm8k, math, svamp, aime"):
    math_tasks.load("mnist", missing)


def test_to_record():
  ex = math_tasks.MathExample("What is 2+3?", "5", "2+3=5")
  rec = math_tasks.to_record(ex)
  assert rec == {"prompt": "Question: What is 2+3?\nSolution:\n",
                 "completion": "2+3=5\nThe answer is 5."}
  # Not doubled; raw solution on request; answer line when there is no solution.
  done = math_tasks.MathExample("q", "5", "2+3=5\nThe answer is 5.")
  assert math_tasks.to_record(done)["completion"] == "2+3=5\nThe answer is 5."
  assert math_tasks.to_record(ex, "Q: {question} A:", with_answer_line=False) == {
      "prompt": "Q: What is 2+3? A:", "completion": "2+3=5"}
  assert math_tasks.to_record(math_tasks.MathExample("q", "7"))["completion"] == (
      "The answer is 7.")
  with pytest.raises(ValueError, match="no {question}"):
    math_tasks.to_record(ex, "no field")


def test_registry():
  assert {"gsm8k", "math", "svamp", "aime"} <= set(registry.names("dataset"))
  assert registry.get("dataset", "gsm8k") is math_tasks.load_gsm8k


def test_grain_source_feeds_pipeline(tmp_path):
  path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
  src = math_tasks.grain_source("gsm8k", path)
  exs = math_tasks.load_gsm8k(path)
  assert len(src) == 2
  for i, ex in enumerate(exs):
    assert src[i] == {**math_tasks.to_record(ex), "answer": ex.answer}
  assert src[1]["completion"].endswith("The answer is 1234.")
  ds = math_tasks.grain_dataset("gsm8k", path)
  assert len(ds) == 2 and ds[1] == src[1]
  tok = tokenizers.CharTokenizer(string.printable)
  it = pipeline.lm_dataset(src, tok, seq_len=512, batch_size=2, shuffle=False, num_epochs=1,
                           shard_index=0, shard_count=1)
  batch = next(it)
  assert batch["inputs"].shape == (2, 512)
  row = batch["targets"][1][batch["loss_mask"][1] == 1]
  assert tok.decode([int(t) for t in row if t != tok.eos_id]) == src[1]["completion"]


def test_answer_accuracy():
  targets = ["Steps.\nThe answer is 72.", "\\frac{1}{2}", "1234", b"The answer is 5."]
  preds = ["So the answer is 72.", "It is \\boxed{0.5}", "#### 1,234", b"The answer is 6."]
  assert math_tasks.answer_accuracy(targets, preds) == {"accuracy": 0.75, "num_examples": 4}
  # A prediction without any answer format is wrong even if it holds the number.
  assert math_tasks.answer_accuracy(["72"], ["72 clips"])["accuracy"] == 0.0
  assert math_tasks.answer_accuracy([], []) == {"accuracy": 0.0, "num_examples": 0}
  with pytest.raises(ValueError):
    math_tasks.answer_accuracy(["1"], [])


def test_seqio_task_matches_loader(tmp_path):
  seqio = pytest.importorskip("seqio")
  g_test = write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)
  m_test = write_parquet(tmp_path / "math_test.parquet", MATH_ROWS)
  paths = {"gsm8k": {"test": g_test}, "math": {"test": m_test, "train": m_test}}
  names = math_tasks.register_seqio_tasks(paths)
  assert names == ["qdc_math_gsm8k", "qdc_math_math"]
  # Idempotent: registering again replaces the tasks.
  assert math_tasks.register_seqio_tasks(paths) == names
  for name, path in (("gsm8k", g_test), ("math", m_test)):
    task = seqio.get_mixture_or_task(math_tasks.task_name(name))
    got = list(task.get_dataset(sequence_length=None, split="test", shuffle=False)
               .as_numpy_iterator())
    want = [math_tasks.to_record(ex) for ex in math_tasks.load(name, path)]
    assert [g["inputs"].decode() for g in got] == [w["prompt"] for w in want]
    assert [g["targets"].decode() for g in got] == [w["completion"] for w in want]
    metrics = task.metric_fns[0]([g["targets"] for g in got], [w["completion"] for w in want])
    assert metrics["accuracy"] == 1.0

  vocab = seqio.ByteVocabulary()
  math_tasks.register_seqio_tasks({"gsm8k": {"test": g_test}}, vocabulary=vocab)
  task = seqio.get_mixture_or_task("qdc_math_gsm8k")
  got = list(task.get_dataset(sequence_length=None, split="test", shuffle=False)
             .as_numpy_iterator())
  want = [math_tasks.to_record(ex) for ex in math_tasks.load_gsm8k(g_test)]
  for g, w in zip(got, want, strict=True):
    assert g["targets"][-1] == vocab.eos_id and vocab.eos_id not in g["inputs"]
    assert vocab.decode(g["inputs"].tolist()) == w["prompt"]
    assert vocab.decode(g["targets"][:-1].tolist()) == w["completion"]
    assert g["answer"].decode() in ("72", "1234")

  with pytest.raises(FileNotFoundError, match="No such AIME file: .*none.jsonl"):
    math_tasks.register_seqio_tasks({"aime": {"test": str(tmp_path / "none.jsonl")}})


def test_load_from_gcs_and_glob(tmp_path, gcs_bucket):  # noqa: F811
  # A bucket dataset through the storage layer (the emulator: no network, real gcsfs).
  from qdc_jax import storage  # pylint: disable=g-import-not-at-top
  local = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
  for shard in ("train-00000.jsonl", "train-00001.jsonl"):
    storage.write_bytes(f"{gcs_bucket}/gsm8k/{shard}", open(local, "rb").read())
  pq_local = write_parquet(tmp_path / "m.parquet", MATH_ROWS)
  storage.write_bytes(f"{gcs_bucket}/math/test.parquet", open(pq_local, "rb").read())
  want = math_tasks.load("gsm8k", local)
  assert math_tasks.load("gsm8k", f"{gcs_bucket}/gsm8k/train-00000.jsonl") == want
  assert math_tasks.load("gsm8k", f"{gcs_bucket}/gsm8k/train-*.jsonl") == want + want
  assert math_tasks.load("math", f"{gcs_bucket}/math/test.parquet") == math_tasks.load(
      "math", pq_local)
  with pytest.raises(FileNotFoundError, match="No GSM8K files match .*test-"):
    math_tasks.load("gsm8k", f"{gcs_bucket}/gsm8k/test-*.jsonl")


def test_tfds_error_paths(tmp_path):
  assert math_tasks.TFDS_BUILDERS == {"gsm8k": "gsm8k"}
  with pytest.raises(ValueError, match="MATH has no TFDS builder"):
    math_tasks.tfds_examples("math", "test", str(tmp_path))
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match=r"'gsm8k'.*not prepared") as e:
    math_tasks.tfds_examples("gsm8k", "test", str(tmp_path))
  assert str(tmp_path) in str(e.value)


def test_tfds_conversion_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    rows = {k: np.array([r[k] for r in GSM8K_ROWS], dtype=object)
            for k in ("question", "answer")}
    return tf.data.Dataset.from_tensor_slices(rows)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    exs = math_tasks.tfds_examples("gsm8k", "test", str(tmp_path))
  assert exs == math_tasks.load_gsm8k(write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS))
