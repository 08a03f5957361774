r"""Return-conditioned RL (thesis 3.3): label each step [GOOD]/[BAD] from rollouts, train on it.

  python -m qdc_jax.main --config=configs/rcrl.py --workdir=/tmp/rcrl_lab
  python -m qdc_jax.main --config=configs/rcrl.py --workdir=/tmp/rcrl_ei \
      --config.policy=/tmp/ei_lab/model            # label with an EI policy, as the thesis does
  python -m qdc_jax.main --config=configs/rcrl.py:gemma --workdir=gs://b/rcrl \
      --config.policy=/ckpt/gemma-ei/model --config.base=/ckpt/gemma-2-9b \
      --config.task.train_path=/data/gsm8k/train.jsonl \
      --config.task.test_path=/data/gsm8k/test.jsonl

The policy samples S solutions per train question; each step is labelled by K rollouts from its
prefix; the balanced, labelled text fine-tunes the base model (SFT hyper-parameters); the
result is sampled step by step conditioned on [GOOD]. Writes rcrl_data.jsonl (labelled
solutions with their rollout returns), rcrl_train.jsonl, rl_report.json, rcrl.png and the
model directory <workdir>/model (its tokenizer can write the labels).

Args: "" / "lab" (default, a few minutes on 2 CPU cores) | "gemma" (thesis-scale; paths from
flags) | "smoke" (seconds; what the tests run).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "rcrl"  # qdc_jax.registry experiment name
  c.policy = "asset:lab_student"  # model directory that samples the data and the rollouts
  c.base = "asset:lab_student"  # model directory fine-tuned on the labelled data (the reset)
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")  # train questions to label; val / test to evaluate
  c.task.train_size = 128
  c.task.val_size = 64
  c.task.test_size = 64

  c.rcrl = ml_collections.ConfigDict()
  c.rcrl.samples_per_question = 4  # S solutions sampled per train question
  c.rcrl.rollouts_per_step = 4  # K rollouts from each step's prefix
  c.rcrl.threshold = 0.5  # T: a step is [GOOD] if the mean rollout return is >= T
  c.rcrl.temperature = 1.0  # sampling temperature of solutions and rollouts (EI explores at 1)
  c.rcrl.max_new_tokens = 160  # token budget of a solution / a rollout
  c.rcrl.balance = "solutions"  # 'solutions' (thesis) | 'steps' (trained labels) | 'none'
  c.rcrl.batch_size = 64  # prompts per sampler call (x K rows)
  c.rcrl.init_label_embeddings = True  # new label characters start at the mean embedding
  c.rcrl.keep_rollouts = True  # store the rollout texts in rcrl_data.jsonl (big at scale)
  c.rcrl.seed = 0  # sampling and balancing

  c.sample = ml_collections.ConfigDict()
  c.sample.step_tokens = 48  # token budget of one conditioned step (a line)
  c.sample.max_steps = 16  # steps per conditioned solution
  c.sample.unconditioned = True  # also sample the RCRL model without forcing labels
  c.compare_on_test = True  # base and unconditioned RCRL on the test splits too (val always)

  c.train = common.sft_train_section("lab")  # SFT hyper-parameters, from the base params
  c.train.epochs = 4.0  # the thesis's 4 epochs (the lab SFT's fixed 200 steps: ~25 epochs)
  c.train.opt.warmup_steps = 5  # the lab SFT's 20 would be most of this short run
  c.eval = common.eval_section(8)  # maj@1 (greedy), maj@K / pass@K at T=0.7, diversity

  if arg in ("", "lab"):
    pass
  elif arg == "gemma":
    c.policy = ""  # required: the EI policy's model directory (--config.policy=...)
    c.base = ""  # required: the pretrained base model directory (--config.base=...)
    c.mesh.shape = (1, -1, 1)  # fsdp over the slice
    c.task = common.task_section("gsm8k")  # paths from --config.task.*_path
    c.task.train_size = 0  # all
    c.task.val_size = 256
    c.task.test_size = 0
    c.rcrl.samples_per_question = 4  # the thesis does not state S; 4 is this project's choice
    c.rcrl.rollouts_per_step = 8  # as the SORM labels (thesis 3.4): 8 per prefix
    c.rcrl.max_new_tokens = 320
    c.rcrl.batch_size = 128
    c.rcrl.keep_rollouts = False
    c.sample.step_tokens = 96
    c.sample.max_steps = 24
    c.train = common.sft_train_section("gemma")
    c.eval = common.eval_section(96)
    c.eval.stop_strings = ("\nQuestion:",)  # base model: end at its answer
    c.eval.max_new_tokens = 320
  elif arg == "smoke":
    c.task.train_size, c.task.val_size, c.task.test_size = 16, 4, 4
    c.rcrl.samples_per_question, c.rcrl.rollouts_per_step = 2, 2
    c.rcrl.max_new_tokens = 64
    c.rcrl.batch_size = 16
    c.sample.step_tokens, c.sample.max_steps = 24, 8
    c.train = common.sft_train_section("smoke")
    c.train.seq_len = 192  # a labelled lab solution with its prompt fits
    c.eval = common.eval_section(2)
    c.eval.max_new_tokens, c.eval.batch_size = 64, 16
    c.compare_on_test = False  # fewer sampler shapes to compile
  else:
    raise ValueError(f"Unknown configs/rcrl.py arg {arg!r}; use '' (or 'lab'), 'gemma' or "
                     f"'smoke'")
  return c
