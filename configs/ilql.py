r"""ILQL (thesis 3.2, trlX): offline RL from (prompt, completion, reward) rows.

  python -m qdc_jax.main --config=configs/ilql.py --workdir=/tmp/ilql_lab
  python -m qdc_jax.main --config=configs/ilql.py --workdir=/tmp/ilql_hydra \
      --config.ilql.frozen_layers=2                  # bottom 2 blocks + embeddings frozen
  python -m qdc_jax.main --config=configs/ilql.py:gemma --workdir=gs://b/ilql \
      --config.policy=/ckpt/gemma2_2b_sft --config.data.path=/data/offline.jsonl \
      --config.task.train_path=/data/gsm8k/train.jsonl \
      --config.task.test_path=/data/gsm8k/test.jsonl

On the lab the offline data are the shipped student's own samples (S per train question at
T = 1), rewarded 1 when the final answer is right; with `data.path` they are JSONL rows
{"prompt", "completion", "reward"}. Writes <workdir>/model (kind "ilql"), rl_report.json
and ilql_curve.png.

Args: "" / "lab" (default, minutes on 2 CPU cores) | "gemma" (trlX's ILQL numbers; paths from
flags) | "smoke" (seconds; what the tests run).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common


def get_config(arg: str = ""):
  preset = {"": "lab"}.get(arg, arg)
  if preset not in ("lab", "gemma", "smoke"):
    raise ValueError(f"Unknown configs/ilql.py arg {arg!r}; use '' (or 'lab'), 'gemma' or "
                     f"'smoke'")
  c = ml_collections.ConfigDict()
  c.experiment = "ilql"  # qdc_jax.registry experiment name
  c.policy = "asset:lab_student"  # the trunk ILQL starts from (and, on the lab, the data's)
  c.seed = 0  # head init, sampling, data order
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")
  c.task.train_size = 256
  c.task.val_size = 64
  c.task.test_size = 128

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # JSONL {"prompt", "completion", "reward"} ('' = lab samples)
  c.data.samples = 4  # lab: S samples per train question
  c.data.temperature = 1.0
  c.data.max_new_tokens = 96
  c.data.batch_size = 64  # prompts per sampler call

  c.ilql = ml_collections.ConfigDict()
  c.ilql.gamma = 0.99  # discount (trlX 0.99)
  c.ilql.tau = 0.7  # V expectile (trlX 0.7)
  c.ilql.cql_scale = 0.1  # CQL weight (trlX 0.1)
  c.ilql.awr_scale = 1.0  # policy term weight (trlX awac_scale 1)
  c.ilql.awr_beta = 1.0  # AWR temperature: weight exp(awr_beta (Q - V)); 0 = plain BC (trlX)
  c.ilql.awr_max_weight = 20.0  # AWR weight clip
  c.ilql.alpha = 0.005  # Polyak rate of the target Q heads per step
  c.ilql.frozen_layers = 0  # bottom blocks (and embeddings) frozen (0 = full fine-tune)
  c.ilql.stages = 4  # validation evaluations over training (the reward-over-time curve)
  c.ilql.eval_beta = 1.0  # beta of those validation evaluations
  c.ilql.betas = (0.0, 1.0, 4.0)  # betas measured on the test splits

  c.train = common.sft_train_section("lab" if preset == "lab" else preset)
  if preset == "lab":
    c.train.epochs, c.train.batch_size, c.train.seq_len, c.train.pack = 2.0, 16, 320, False
    c.train.opt.lr, c.train.opt.warmup_steps, c.train.opt.final_lr_ratio = 1e-4, 10, 0.1
    c.train.log_every, c.train.save_every = 16, 32
  c.eval = common.eval_section(4)
  c.eval.temperature = 1.0  # the validation reward: mean correctness of samples at T = 1
  c.eval.ks = (1, 4)

  if preset == "gemma":
    c.policy = ""  # required: the SFT'd Gemma's model directory
    c.mesh.shape = (1, -1, 1)
    c.task = common.task_section("gsm8k")
    c.task.train_size, c.task.test_size = 0, 0
    c.train.epochs, c.train.batch_size, c.train.seq_len = 1.0, 64, 1024
    c.train.opt.lr, c.train.opt.warmup_steps, c.train.opt.final_lr_ratio = 5e-5, 50, 0.0
    c.eval = common.eval_section(16)
    c.eval.stop_strings = ("\nQuestion:",)
    c.eval.max_new_tokens = 300
  elif preset == "smoke":
    c.task.train_size, c.task.val_size, c.task.test_size = 16, 8, 8
    c.data.samples, c.data.max_new_tokens, c.data.batch_size = 2, 48, 16
    c.train.steps, c.train.seq_len = 4, 256
    c.ilql.stages = 2
    c.ilql.betas = (1.0,)  # = eval_beta: the validation sampler is reused, no new compile
    c.eval = common.eval_section(2)
    c.eval.ks = (1, 2)
    c.eval.max_new_tokens = 48
  return c
