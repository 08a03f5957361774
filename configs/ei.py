r"""Expert Iteration: sample K per question, keep the correct ones, refit the base, repeat.

  python -m qdc_jax.main --config=configs/ei.py --workdir=/tmp/ei_lab
  python -m qdc_jax.main --config=configs/ei.py:k4 --workdir=/tmp/ei_lab_k4
  python -m qdc_jax.main --config=configs/ei.py:gemma --workdir=/mnt/runs/ei_gsm8k \
      --config.base=/ckpt/gemma-2-9b --config.init_from=/ckpt/gemma-2-9b-gsm8k-sft \
      --config.task.train_path=/data/gsm8k/train.jsonl \
      --config.task.test_path=/data/gsm8k/test.jsonl

Writes <workdir>/round_<i>/ (samples, D_i, the fit, done.json), <workdir>/model (the round
with the best validation maj@1; RCRL takes it as --config.policy=<workdir>/model),
<workdir>/rl_report.json and <workdir>/ei_curve.png. Re-running on the workdir resumes;
a workdir made with different settings is refused.

Args:
  ""      the lab (default): the shipped student, K=16 on 512 questions, up to 4 rounds.
  k4      the lab with K=4 samples per question (more, cheaper rounds).
  gemma   thesis numbers: K=96 at T=1.0, refit 4 epochs lr 2e-5 -> 2e-7 batch 128, GSM8K;
          model and data paths from flags.
  smoke   seconds; what the tests run.
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common

_ARGS = ("", "lab", "k4", "gemma", "smoke")


def get_config(arg: str = ""):
  if arg not in _ARGS:
    raise ValueError(f"Unknown configs/ei.py arg {arg!r}; use '' (lab), 'k4', 'gemma' or "
                     f"'smoke'")
  preset = {"": "lab", "k4": "lab"}.get(arg, arg)
  c = ml_collections.ConfigDict()
  c.experiment = "ei"  # qdc_jax.registry experiment name
  # Every round fine-tunes THIS model (thesis: the pretrained model). The lab has no separate
  # pretrained model, so its base is the shipped student.
  c.base = "asset:lab_student"
  c.init_from = ""  # the policy that samples round 1 ('' = base; e.g. an SFT run's model)
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")  # train questions explored on, val, test (rl/common.py)

  c.ei = ml_collections.ConfigDict()
  c.ei.variant = "k16"  # name in the report ('k16' | 'k4' | ...)
  c.ei.k = 16  # completions sampled per train question per round (thesis: 96; K=4 variant)
  # > 0: rollouts stream through this many decode rows (continuous batching; the same
  # samples, so not part of the settings fingerprint). Pays when completion lengths spread.
  c.ei.slots = 0
  c.ei.temperature = 1.0  # rollout temperature (thesis: 1.0)
  c.ei.max_new_tokens = 80  # rollout budget; lab train solutions are <= 76 characters
  # Which samples R_i keeps: 'answer' (thesis: final answer correct, the sparse reward) |
  # 'answer_and_steps' (lab only: also every written step is true arithmetic).
  c.ei.keep = "answer"
  c.ei.batch_size = 32  # questions per sampler call (x k rows); one compiled shape per run
  c.ei.seed = 0  # rollout randomness (round i uses fold_in(seed, i))
  c.ei.rounds = 4  # most rounds
  c.ei.patience = 1  # stop after this many rounds without a val maj@1 gain ...
  c.ei.min_gain = 0.0  # ... larger than this over the best so far
  c.ei.stop_after_round = -1  # stop (resumable) after finishing this round; -1 = off
  c.ei.prune_checkpoints = True  # keep fit checkpoints of the latest and best rounds only
  c.ei.stop_strings = ()  # texts that end a rollout (base models: ("\nQuestion:",))

  # The SFT hyper-parameters: each round refits the base on D_i with them.
  c.train = common.sft_train_section(preset)
  c.eval = common.eval_section(16)  # validation per round / test at the end

  if preset == "lab":
    # Thesis: 4 epochs over D_i (an epoch = the packed rows D_i fills; see
    # experiments/ei.train_config), at the lab SFT learning rate.
    c.train.epochs, c.train.save_every = 4.0, 50
  if arg == "k4":
    c.ei.variant, c.ei.k, c.ei.rounds = "k4", 4, 8
    c.ei.batch_size = 128  # the same 512 sampler rows per call as K=16
  elif arg == "gemma":
    c.base = ""  # required: --config.base=<model_io dir of the pretrained model>
    c.mesh.shape = (1, -1, 1)  # FSDP over every chip
    c.task = common.task_section("gsm8k")
    c.task.train_size = 0  # every train question
    c.task.val_size = 256  # held out of the train file when task.val_path is ''
    c.task.test_size = 0
    c.ei.variant, c.ei.k, c.ei.temperature = "k96", 96, 1.0
    c.ei.max_new_tokens = 512
    # A base model would run on past its answer and invent the next question.
    c.ei.stop_strings = ("\nQuestion:",)
    c.ei.batch_size = 8  # x 96 = 768 rows per sampler call
    c.ei.rounds, c.ei.patience, c.ei.min_gain = 6, 1, 0.0  # thesis: saturates after 2-5
    c.eval = common.eval_section(96)  # maj@96 / pass@96 at T=0.7
    c.eval.stop_strings = ("\nQuestion:",)  # base model: end at its answer
    c.eval.max_new_tokens = 512
    c.eval.batch_size = 16
  elif arg == "smoke":
    c.ei.variant = "smoke"
    c.task.train_size, c.task.val_size, c.task.test_size = 8, 4, 4
    c.ei.k, c.ei.max_new_tokens, c.ei.batch_size = 4, 80, 4
    c.ei.rounds, c.ei.patience = 2, 5  # always both rounds
    c.eval = common.eval_section(2)
    c.eval.max_new_tokens = 64
    c.eval.ks = (1, 2)
  return c
