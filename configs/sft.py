r"""Supervised fine-tuning of a policy on reference solutions (the thesis's SFT baseline).

  python -m qdc_jax.main --config=configs/sft.py --workdir=/tmp/sft_lab
  python -m qdc_jax.main --config=configs/sft.py:gemma --workdir=/mnt/runs/sft_gsm8k \
      --config.init_from=/ckpt/gemma-2-9b --config.task.train_path=/data/gsm8k/train.jsonl \
      --config.task.test_path=/data/gsm8k/test.jsonl

Fine-tunes `init_from` on (question, reference solution) records of the task's train split,
exports the result to <workdir>/model, and writes <workdir>/rl_report.json (validation curve:
the initial policy, then the fine-tuned one; final: every test split). `init_from` is a
`qdc_jax.model_io` directory (convert a Gemma checkpoint with `qdc_jax.models.gemma_io` first).

Args:
  ""      the lab (default): the shipped student on 4096 reference solutions (minutes).
  gemma   thesis numbers: 4 epochs, batch 128, lr 2e-5 -> 2e-7 cosine, GSM8K, maj@96;
          model and data paths from flags.
  smoke   seconds; what the tests run.
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common

_ARGS = ("", "lab", "gemma", "smoke")


def get_config(arg: str = ""):
  if arg not in _ARGS:
    raise ValueError(f"Unknown configs/sft.py arg {arg!r}; use '' (lab), 'gemma' or 'smoke'")
  preset = {"": "lab"}.get(arg, arg)
  c = ml_collections.ConfigDict()
  c.experiment = "sft"  # qdc_jax.registry experiment name
  c.init_from = "asset:lab_student"  # model directory (or "asset:NAME") to fine-tune
  c.seed = 0  # recorded in the report; sampling seeds are eval.seed and train.seed
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")  # questions + reference solutions (see rl/common.py)
  # SFT uses the reference solutions, which are free on the lab: train on more of them than the
  # 512 questions RL explores on.
  c.task.train_size = 4096
  c.train = common.sft_train_section(preset)  # qdc_jax.fit knobs (+ epochs)
  c.eval = common.eval_section(16)  # maj@1 (greedy), maj@k / pass@k at eval.temperature

  if preset == "gemma":
    c.init_from = ""  # required: --config.init_from=<model_io dir of the pretrained model>
    c.mesh.shape = (1, -1, 1)  # FSDP over every chip: 9B params + AdamW do not fit one
    c.task = common.task_section("gsm8k")
    c.task.train_size = 0  # all of the train file
    c.task.val_size = 256  # held out of the train file when task.val_path is ''
    c.task.test_size = 0  # the whole test file
    c.eval = common.eval_section(96)  # thesis: maj@96 / pass@96 at T=0.7
    c.eval.stop_strings = ("\nQuestion:",)  # base model: end at its answer
    c.eval.max_new_tokens = 512
    c.eval.batch_size = 16
  elif preset == "smoke":
    # Questions and eval as configs/ei.py:smoke, so the tests' runs share compiled shapes.
    c.task.train_size, c.task.val_size, c.task.test_size = 64, 4, 4
    c.eval = common.eval_section(2)
    c.eval.max_new_tokens = 64
    c.eval.ks = (1, 2)
  return c
