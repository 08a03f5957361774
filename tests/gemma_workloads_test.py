"""The README's Gemma commands, run verbatim: convert a tiny random Gemma-2 (Kaggle orbax and
HF safetensors), then SPARQ (gemma_chat + LM annotator), SFT, EI, PPO (Hydra + LoRA), RCRL and
evaluate from the converted directories, each as `python -m ...` in a fresh process.

What a random model cannot show (annotator replies that name vocabulary skills) is tested
with a scripted annotator in sparq_loop_test.py; here every workload must run end to end on
the Gemma path: SentencePiece tokenizer, Gemma chat turns, stop strings, real dataset files,
model directories handed from one workload to the next, and a SPARQ resume.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import sentencepiece as spm

from qdc_jax import model_io
from qdc_jax.sparq import skills

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = "/tmp/qdc_tiny"  # the README's paths, replaced by the test's own folder


def _readme_commands() -> list[str]:
  with open(os.path.join(REPO, "README.md")) as fh:
    text = fh.read()
  block = re.search(r"<!-- gemma-commands -->\n```\n(.*?)```\n<!-- /gemma-commands -->", text,
                    re.S)
  assert block, "README.md lost its gemma-commands block"
  return [line for line in block.group(1).splitlines() if line.strip()]


def _run(line: str, root: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop
  argv = shlex.split(line.replace(ROOT, root))
  assert argv[0] == "python"
  run = subprocess.run([sys.executable] + argv[1:], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert run.returncode == 0, f"{line}\n{run.stderr[-4000:]}"
  return run.stdout + run.stderr


def _rows(path):
  with open(path) as fh:
    return [json.loads(l) for l in fh if l.strip()]


def _check_model_dir(path, tokenizer_bytes, added_pieces=()):
  """A self-contained model directory: its own tokenizer.model, named relative; the base
  tokenizer itself, or (RCRL) the base with `added_pieces` as one piece each."""
  with open(os.path.join(path, "model.json")) as fh:
    meta = json.load(fh)["tokenizer"]
  expected = {"kind": "sentencepiece", "path": "tokenizer.model"}
  if added_pieces:
    expected["added_pieces"] = list(added_pieces)
  assert meta == expected
  cfg, _, tok, _, _ = model_io.load_model(path)
  assert tok.piece_to_id("<end_of_turn>") == 107 and cfg.d_model == 64
  with open(os.path.join(path, "tokenizer.model"), "rb") as fh:
    exported = fh.read()
  if not added_pieces:
    assert exported == tokenizer_bytes
  else:  # every used base piece keeps its id; each label encodes as one id below vocab_size
    base = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    for i in range(base.get_piece_size()):
      if not base.id_to_piece(i).startswith("<unused"):
        assert tok.processor.id_to_piece(i) == base.id_to_piece(i), i
    for piece in added_pieces:
      ids = tok.encode(piece)
      assert len(ids) == 1 and ids[0] < cfg.vocab_size, (piece, ids)
  return cfg


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("qdc_tiny"))
  logs = {}
  for line in _readme_commands():
    name = (re.search(r"--workdir=\S*/(\w+)", line) or re.search(r"--out=\S*/(\w+)", line)
            or re.search(r"(tiny_gemma)", line)).group(1)
    logs[name] = _run(line, root)
  return root, logs


def test_readme_lists_every_workload():
  text = "\n".join(_readme_commands())
  for needle in ("gemma_io convert --checkpoint=/tmp/qdc_tiny/kaggle",
                 "gemma_io convert --checkpoint=/tmp/qdc_tiny/hf", "configs/sparq.py",
                 "--config.prompt_format=gemma_chat", "--config.annotator.kind=lm",
                 "configs/ei.py", "configs/ppo.py", "--config.ppo.frozen_layers=1",
                 "--config.ppo.lora_rank=8", "configs/rcrl.py", "configs/evaluate.py"):
    assert needle in text, needle


def test_converted_directories(ran):
  root, _ = ran
  with open(os.path.join(root, "tokenizer.model"), "rb") as fh:
    tok = fh.read()
  assert _check_model_dir(os.path.join(root, "gemma_kaggle"), tok).vocab_size == 256
  assert _check_model_dir(os.path.join(root, "gemma_hf"), tok).vocab_size == 192


def test_sparq_gemma_chat_lm_annotator_and_resume(ran):
  root, _ = ran
  workdir = os.path.join(root, "sparq")
  with open(os.path.join(workdir, "config.json")) as fh:
    config = json.load(fh)
  assert config["prompt_format"] == "gemma_chat" and config["annotator"]["kind"] == "lm"
  archive = os.path.join(workdir, "archive")
  names = sorted(os.listdir(archive))
  assert names == [f"round_{r:06d}.{ext}" for r in range(4) for ext in ("json", "jsonl")]
  with open(os.path.join(archive, "round_000000.json")) as fh:
    state = json.load(fh)["state"]
  skills.SkillVocabulary.from_json(state["vocabulary"])  # the annotator's seed vocabulary
  seeds = _rows(os.path.join(archive, "round_000000.jsonl"))
  assert len(seeds) == 24 and all(s["successful_solutions"] for s in seeds)  # MATH rows
  children = [r for n in names[2:] if n.endswith(".jsonl") for r in _rows(
      os.path.join(archive, n))]
  assert len(children) == 3 * 8 and all(c["raw_output"] for c in children)
  with open(os.path.join(workdir, "report.json")) as fh:
    report = json.load(fh)
  assert set(report["baseline"]) == {"in_dist", "ood"}  # math_test.jsonl and aime.jsonl
  before = {n: open(os.path.join(archive, n), "rb").read() for n in names}
  metrics_before = _rows(os.path.join(workdir, "sparq_metrics.jsonl"))

  # Re-running the same command resumes: nothing regenerated, nothing logged twice.
  sparq_line = next(l for l in _readme_commands() if "configs/sparq.py" in l)
  _run(sparq_line, root)
  assert sorted(os.listdir(archive)) == names
  assert {n: open(os.path.join(archive, n), "rb").read() for n in names} == before
  metrics = _rows(os.path.join(workdir, "sparq_metrics.jsonl"))
  assert [r["step"] for r in metrics] == [r["step"] for r in metrics_before]


def test_sft_ei_ppo_rcrl_evaluate(ran):
  root, logs = ran
  with open(os.path.join(root, "tokenizer.model"), "rb") as fh:
    tok = fh.read()
  for name in ("sft", "ei", "ppo"):  # every export carries its own tokenizer
    _check_model_dir(os.path.join(root, name, "model"), tok)
  _check_model_dir(os.path.join(root, "rcrl", "model"), tok, added_pieces=("[GOOD]", "[BAD]"))
  # SFT fit the HF-converted model; EI sampled from it, kept correct samples and refit.
  sft_loss = [r["loss"] for r in _rows(os.path.join(root, "sft", "sft_metrics.jsonl"))
              if "loss" in r]
  assert sft_loss[-1] < 0.5 * sft_loss[0]
  with open(os.path.join(root, "ei", "rl_report.json")) as fh:
    ei = json.load(fh)
  assert max(ei["notes"]["dataset_size"]) > 0, "no correct rollout: EI never refit"
  assert os.path.exists(os.path.join(root, "ei", "round_1", "train_metrics.jsonl"))
  # PPO: Hydra + LoRA really on (state smaller than the naive layout), rewards from rollouts.
  assert "PPO state bytes" in logs["ppo"] and "ratio 0." in logs["ppo"]
  ppo = _rows(os.path.join(root, "ppo", "ppo_metrics.jsonl"))
  assert [r["step"] for r in ppo if "reward" in r] == [1, 2]
  # RCRL: labelled steps, trained, evaluated conditioned on [GOOD].
  data = _rows(os.path.join(root, "rcrl", "rcrl_data.jsonl"))
  assert data and all(len(d["labels"]) == len(d["step_correct"]) for d in data)
  assert os.path.exists(os.path.join(root, "rcrl", "rl_report.json"))
  with open(os.path.join(root, "eval", "eval_report.json")) as fh:
    report = json.load(fh)
  assert report["model_dir"].endswith("/ei/model") and list(report["results"]) == ["gsm8k"]
  assert report["sampling"]["stop_strings"] == ["\nQuestion:"]
  assert report["results"]["gsm8k"]["num_problems"] == 8  # every row of gsm8k_test.jsonl
