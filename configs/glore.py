r"""GLoRe (thesis 3.4): ORM, balanced ORM, SORM, global and local refinement.

  python -m qdc_jax.main --config=configs/glore.py --workdir=/tmp/glore_lab
  python -m qdc_jax.main --config=configs/glore.py --workdir=/tmp/glore_ei \
      --config.student=/tmp/ei_lab/model             # an EI student, as the thesis uses
  python -m qdc_jax.main --config=configs/glore.py:gemma --workdir=gs://b/glore \
      --config.student=/ckpt/gemma-ei/model \
      --config.task.train_path=/data/gsm8k/train.jsonl \
      --config.task.test_path=/data/gsm8k/test.jsonl --config.test_split=gsm8k

Writes train_solutions.jsonl / test_solutions.jsonl (solutions, rollout checks, oracle), the
reward models <workdir>/{orm,balanced_orm,sorm}/model, the refiners
<workdir>/refine_{global,local}/model, report.md, report.json and glore.png. A trained ORM
directory is what PPO's `--config.reward.name=model --config.reward.model_dir=` takes, and
what `--config.eval.reward_model=` of any RL workload reranks with.

Args: "" / "lab" (default, about 10 minutes on 2 CPU cores) | "gemma" (the thesis's
hyper-parameters; paths from flags) | "smoke" (seconds; what the tests run).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax.rl import common


def _rm_train(preset):
  t = common.sft_train_section("lab" if preset == "lab" else preset)
  if preset == "lab":
    t.epochs, t.batch_size, t.seq_len, t.pack = 2.0, 32, 320, False
    t.opt.lr, t.opt.warmup_steps, t.opt.final_lr_ratio = 3e-4, 10, 0.1
    t.log_every, t.save_every, t.eval_every = 25, 50, 50
  elif preset == "gemma":
    # Thesis: (S)ORMs 1 epoch, lr 2e-6, global batch 256, cosine.
    t.epochs, t.batch_size, t.seq_len = 1.0, 256, 768
    t.opt.lr, t.opt.warmup_steps, t.opt.final_lr_ratio = 2e-6, 20, 0.0
  else:
    t.seq_len = 256  # a lab word problem's prompt is up to ~190 characters
  return t


def _refine_train(preset):
  t = common.sft_train_section(preset)
  if preset == "lab":
    t.epochs, t.batch_size, t.seq_len, t.pack = 2.0, 16, 448, False
    t.opt.lr, t.opt.warmup_steps, t.opt.final_lr_ratio = 3e-4, 10, 0.1
    t.log_every, t.save_every = 25, 100
  elif preset == "gemma":
    # Thesis: refiners 1 epoch, lr 2e-5, global batch 128, cosine.
    t.epochs, t.batch_size, t.seq_len = 1.0, 128, 1024
    t.opt.lr, t.opt.final_lr_ratio = 2e-5, 0.0
  else:
    t.seq_len = 320
  return t


def get_config(arg: str = ""):
  preset = {"": "lab"}.get(arg, arg)
  if preset not in ("lab", "gemma", "smoke"):
    raise ValueError(f"Unknown configs/glore.py arg {arg!r}; use '' (or 'lab'), 'gemma' or "
                     f"'smoke'")
  c = ml_collections.ConfigDict()
  c.experiment = "glore"  # qdc_jax.registry experiment name
  c.student = "asset:lab_student"  # samples drafts and rollouts; the trunk every model starts from
  c.seed = 0  # sampling, balancing, data order
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.task = common.task_section("lab")
  c.task.train_size = 256
  c.task.val_size = 16  # unused (no model selection); kept small
  c.task.test_size = 128
  c.test_split = "in_dist"  # which test split the drafts come from

  c.glore = ml_collections.ConfigDict()
  c.glore.train = ml_collections.ConfigDict({"samples": 4})  # S samples per train question
  c.glore.test = ml_collections.ConfigDict({"samples": 3})  # best-of-3 beside the greedy draft
  c.glore.rollouts_per_step = 8  # K rollouts per step prefix (thesis: 8)
  c.glore.max_new_tokens = 96  # a solution / rollout (thesis: at most 300)
  c.glore.temperature = 1.0  # solutions and rollouts
  c.glore.batch_size = 64  # prompts per sampler call
  c.glore.slots = 512  # decode slots of the continuous-batching sampler (0 = plain batches)
  c.glore.stop_strings = ()  # texts that end a sample (base models: ("\nQuestion:",))
  c.glore.consistency = True  # SORM labels need the step's result in the verifying rollout

  c.rm_train = _rm_train(preset)  # ORM, balanced ORM, SORM (one each)
  c.refine_train = _refine_train(preset)  # the global and the local refiner
  c.eval = common.eval_section(8)  # the student with the ORM: maj@k, pass@k, rerank@k

  if preset == "gemma":
    c.student = ""  # required: the EI student's model directory
    c.mesh.shape = (1, -1, 1)
    c.task = common.task_section("gsm8k")
    c.task.train_size, c.task.val_size, c.task.test_size = 0, 16, 0
    c.test_split = "gsm8k"
    c.glore.train.samples = 4
    c.glore.max_new_tokens = 300
    c.glore.batch_size = 128
    c.glore.slots = 1024
    c.glore.stop_strings = ("\nQuestion:",)
    c.eval = common.eval_section(96)
    c.eval.stop_strings = ("\nQuestion:",)
    c.eval.max_new_tokens = 300
  elif preset == "smoke":
    c.task.train_size, c.task.val_size, c.task.test_size = 24, 4, 6
    c.glore.train.samples, c.glore.test.samples = 2, 2
    c.glore.rollouts_per_step = 2
    c.glore.max_new_tokens = 48
    c.glore.batch_size, c.glore.slots = 16, 0
    c.eval = common.eval_section(2)
    c.eval.max_new_tokens, c.eval.batch_size = 48, 16
  return c
