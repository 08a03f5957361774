r"""Preference reward model (thesis 3.2, trlX): Bradley-Terry on (prompt, chosen, rejected).

  python -m qdc_jax.main --config=configs/preference_rm.py --workdir=/tmp/prm_lab
  python -m qdc_jax.main --config=configs/preference_rm.py:gemma --workdir=gs://b/prm \
      --config.student=/ckpt/gemma2_2b \
      --config.data.train_path=/data/hh/train.jsonl --config.data.test_path=/data/hh/test.jsonl
  python -m qdc_jax.main --config=configs/ppo.py --workdir=/tmp/ppo_prm \
      --config.reward.name=model --config.reward.model_dir=/tmp/prm_lab/model

On the lab the pairs come from the student's own samples (correct over incorrect; of two
incorrect ones, the one whose first wrong step comes later); with `data.*_path` they are read
from JSONL rows {"prompt", "chosen", "rejected"} or Anthropic HH rows {"chosen", "rejected"}.
Writes <workdir>/model (a reward-model directory PPO's `reward.name=model` takes), report.md,
report.json and preference_rm.png.

Args: "" / "lab" (default, a few minutes on 2 CPU cores) | "gemma" (HH-style files, paths
from flags) | "smoke" (seconds; what the tests run).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common


def _train(preset):
  t = common.sft_train_section("lab" if preset == "lab" else preset)
  if preset == "lab":
    t.epochs, t.batch_size, t.seq_len, t.pack = 2.0, 16, 320, False
    t.opt.lr, t.opt.warmup_steps, t.opt.final_lr_ratio = 1e-4, 10, 0.1
    t.log_every, t.save_every, t.eval_every = 25, 50, 50
  elif preset == "gemma":
    # trlX's HH reward model: 1 epoch, small lr, cosine.
    t.epochs, t.batch_size, t.seq_len = 1.0, 64, 1024
    t.opt.lr, t.opt.warmup_steps, t.opt.final_lr_ratio = 1e-5, 50, 0.0
  else:
    t.seq_len = 256
  return t


def get_config(arg: str = ""):
  preset = {"": "lab"}.get(arg, arg)
  if preset not in ("lab", "gemma", "smoke"):
    raise ValueError(f"Unknown configs/preference_rm.py arg {arg!r}; use '' (or 'lab'), "
                     f"'gemma' or 'smoke'")
  c = ml_collections.ConfigDict()
  c.experiment = "preference_rm"  # qdc_jax.registry experiment name
  c.student = "asset:lab_student"  # samples the lab pairs; the trunk the reward model starts from
  c.seed = 0  # sampling, pair choice, data order, bootstrap
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")  # lab pairs: questions the student answers
  c.task.train_size = 256
  c.task.val_size = 16  # unused; kept small
  c.task.test_size = 128
  c.test_split = "in_dist"  # lab: which test split the held-out pairs come from

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""  # JSONL preference rows ('' = lab pairs from the student)
  c.data.test_path = ""  # held-out JSONL preference rows (with train_path)
  c.data.limit = 0  # rows read from each file (0 = all)

  c.pairs = ml_collections.ConfigDict()
  c.pairs.samples = 8  # lab: S samples per question the pairs are formed from
  c.pairs.max_per_question = 8  # lab: pairs kept per question (0 = all)
  c.pairs.tie_break = "first_error"  # lab, equal correctness: 'first_error' | 'none'
  c.pairs.max_new_tokens = 96
  c.pairs.temperature = 1.0
  c.pairs.batch_size = 64  # prompts per sampler call; rows per scoring call
  c.pairs.slots = 0  # decode slots of the continuous-batching sampler (0 = plain batches)
  c.pairs.stop_strings = ()

  c.train = _train(preset)

  if preset == "gemma":
    c.student = ""  # required: the base model's directory
    c.mesh.shape = (1, -1, 1)
    c.data.train_path = ""  # required with data.test_path
    c.pairs.batch_size = 128
  elif preset == "smoke":
    c.task.train_size, c.task.val_size, c.task.test_size = 24, 4, 8
    c.pairs.samples, c.pairs.max_per_question = 4, 4
    c.pairs.max_new_tokens = 48
    c.pairs.batch_size = 16
  return c
