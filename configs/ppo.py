r"""PPO for reasoning (thesis 3.3) from a policy model directory.

  python -m qdc_jax.main --config=configs/ppo.py --workdir=/tmp/qdc_ppo
  python -m qdc_jax.main --config=configs/ppo.py:dense --workdir=/tmp/qdc_ppo_dense
  python -m qdc_jax.main --config=configs/ppo.py:gemma --workdir=$DIR \
      --config.policy=/ckpt/gemma2_2b_sft --config.task.train_path=gsm8k_train.jsonl \
      --config.task.test_path=gsm8k_test.jsonl

Args:
  ""          lab: from the shipped student, sparse reward, full fine-tune (minutes on 2 cores).
  dense       lab, dense (step-matching) reward.
  hydra_lora  lab, bottom block frozen and shared (Hydra) + LoRA rank 8 on the rest.
  a2c         lab, A2C (thesis 3.2): one on-policy gradient step per rollout batch (1 epoch,
              the whole batch as the minibatch), so the ratio is 1 and the clipped objectives
              reduce to the advantage-weighted policy gradient and the plain value regression.
  gemma       the thesis's numbers (rollouts 1024 = 256 questions x N=4 at T=0.7, 4 epochs,
              batch 256, lr 1e-6, LoRA 128, KL 0.05, 4-layer value branch); paths from flags.
  smoke       seconds; what the tests run.
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "ppo"
  c.variant = arg or "sparse"  # a name for reports
  c.policy = "asset:lab_student"  # model directory to start from (thesis: the SFT model)
  c.seed = 0  # LoRA init, question order and sampling keys
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")

  c.reward = ml_collections.ConfigDict()
  c.reward.name = "sparse"  # registry "reward": 'sparse' | 'dense' | 'model'
  c.reward.step_weight = 0.5  # dense: total reward of matching every reference step
  c.reward.model_dir = ""  # 'model': a reward-model directory (<glore workdir>/orm/model)

  c.ppo = ml_collections.ConfigDict()
  c.ppo.iterations = 40  # rollout batches (each followed by one PPO update)
  c.ppo.questions_per_batch = 8  # questions per rollout batch
  c.ppo.samples_per_question = 4  # N samples per question
  c.ppo.best_k = 4  # keep the best K of the N (K = N: keep all)
  c.ppo.temperature = 0.7  # exploration temperature (thesis: 0.7 from SFT, 0.2 prompted)
  c.ppo.max_new_tokens = 96  # completion budget while exploring (lab solutions: <= ~80)
  c.ppo.seq_bucket = 128  # rollout rows padded to a multiple of this (fewer compiles)
  c.ppo.epochs = 4  # PPO epochs over each rollout batch
  c.ppo.minibatch_size = 8  # rows per gradient step; rollout rows must be a multiple
  c.ppo.clip_eps = 0.2  # policy ratio clip
  c.ppo.value_clip = 0.2  # value clip
  c.ppo.vf_coef = 1.0  # value loss weight
  c.ppo.gamma = 1.0  # discount
  c.ppo.lam = 0.95  # GAE lambda
  c.ppo.whiten_advantages = True  # whiten advantages per rollout batch
  c.ppo.kl_coef = 0.05  # per-token KL penalty against the frozen reference
  c.ppo.adaptive_kl = False  # adapt kl_coef towards kl_target (Ziegler et al.)
  c.ppo.kl_target = 6.0  # adaptive: target KL per sequence
  c.ppo.kl_horizon = 10_000  # adaptive: controller horizon (rows)
  c.ppo.value_layers = 2  # value branch depth (copies of the top blocks; thesis: 4)
  c.ppo.frozen_layers = 0  # Hydra: bottom blocks frozen and shared (0 = off)
  c.ppo.lora_rank = 0  # LoRA rank on the trained blocks (0 = full fine-tune; thesis: 128)
  c.ppo.lora_alpha = 0.0  # LoRA alpha (<= 0: scale 1)
  c.ppo.log_every = 5  # console line every N iterations (every one goes to TensorBoard)
  c.ppo.save_every = 5  # checkpoint every N iterations (and at every evaluation)
  c.ppo.stop_after_iteration = -1  # stop (resumable) after this iteration; -1 = run them all

  c.opt = ml_collections.ConfigDict(dict(
      lr=2e-5,  # peak learning rate (1e-4 collapsed the lab student within 6 batches)
      warmup_steps=10,  # optimiser steps of linear warmup
      final_lr_ratio=1.0,  # 1.0 = constant after warmup
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0))

  c.eval = common.eval_section(16)
  c.eval.every = 10  # evaluate on the validation questions every N iterations

  if arg == "dense":
    c.reward.name = "dense"
  elif arg == "hydra_lora":
    c.ppo.frozen_layers = 1
    c.ppo.lora_rank = 8
    c.opt.lr = 5e-4  # LoRA factors start at zero and need a larger step
  elif arg == "a2c":
    c.ppo.epochs = 1
    c.ppo.minibatch_size = c.ppo.questions_per_batch * c.ppo.best_k  # every rollout row
  elif arg == "gemma":
    c.policy = ""  # --config.policy=<model directory of the SFT'd Gemma>
    c.task = common.task_section("gsm8k")
    c.task.train_size = 0
    c.task.test_size = 0
    c.task.prompt_template = "Question: {question}\nSolution:\n"
    c.ppo.iterations = 250  # x 4 epochs x 4 minibatches = 4000 gradient steps
    c.ppo.questions_per_batch = 256  # x N=4 = 1024 rollouts per batch
    c.ppo.max_new_tokens = 300
    c.ppo.minibatch_size = 256
    c.ppo.value_layers = 4
    c.ppo.lora_rank = 128
    c.ppo.save_every = 10
    c.opt.lr = 1e-6
    c.opt.warmup_steps = 0
    c.eval = common.eval_section(96)  # as configs/ei.py:gemma, so the curves compare
    c.eval.stop_strings = ("\nQuestion:",)  # base model: end at its answer
    c.eval.max_new_tokens = 512
    c.eval.batch_size = 16
    c.eval.every = 25
    c.mesh = config_lib.mesh_section((1, -1, 1))  # FSDP over every chip
  elif arg == "smoke":
    c.task.train_size, c.task.val_size, c.task.test_size = 32, 8, 8
    c.ppo.iterations = 2
    c.ppo.questions_per_batch = 4
    c.ppo.samples_per_question = 4
    c.ppo.best_k = 2  # best-K-of-N really selects
    c.ppo.minibatch_size = 4
    c.ppo.epochs = 2
    c.ppo.max_new_tokens = 48
    c.ppo.save_every = 1
    c.eval = common.eval_section(2)
    c.eval.ks = (1, 2)
    c.eval.max_new_tokens = 48
    c.eval.every = 2
  elif arg:
    raise ValueError(f"Unknown configs/ppo.py arg {arg!r}; use '', 'dense', 'hydra_lora', "
                     f"'a2c', 'gemma' or 'smoke'")
  return c
