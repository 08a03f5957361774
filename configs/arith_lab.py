r"""Train a lab student from scratch: arithmetic questions -> step-by-step solutions.

  python -m qdc_jax.main --config=configs/arith_lab.py --workdir=/tmp/qdc_lab
  python -m qdc_jax.main --config=configs/arith_lab.py:smoke --workdir=/tmp/qdc_smoke

Arg: "" (default lab run, minutes on 2 CPU cores) | "smoke" (seconds; what tests run).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax import fit


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "lm"  # qdc_jax.registry experiment name
  c.model = config_lib.model_section("lab_tiny")  # a named model; fields override it
  c.mesh = config_lib.mesh_section((-1, 1, 1))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "char"  # 'char' (lab alphabet) | 'sentencepiece'
  c.tokenizer.path = ""  # SentencePiece model file when kind == 'sentencepiece'

  c.data = ml_collections.ConfigDict()
  c.data.source = "arith"  # 'arith' (the lab) | 'jsonl'
  c.data.seed = 0  # which lab problems
  c.data.train_size = 20_000  # lab training problems
  c.data.eval_size = 256  # held-out problems for eval loss
  c.data.test_size = 256  # held-out problems per split for greedy accuracy
  c.data.train_path = ""  # jsonl: {'prompt', 'completion'} per line
  c.data.eval_path = ""

  c.train = fit.default_train_config()
  c.train.steps = 400
  c.train.batch_size = 16
  c.train.seq_len = 256  # covers ~90% of in-distribution problems; longer ones are cut
  c.train.log_every = 50
  c.train.save_every = 200
  c.train.opt.lr = 3e-3
  c.train.opt.warmup_steps = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.max_new_tokens = 96  # solution budget of the greedy accuracy check

  if arg == "smoke":
    c.model.name = "lab_tiny"
    c.data.train_size, c.data.eval_size, c.data.test_size = 256, 16, 16
    c.train.steps, c.train.batch_size, c.train.seq_len = 6, 8, 128
    c.train.log_every, c.train.save_every = 2, 3
    c.train.opt.warmup_steps = 2
    c.eval.max_new_tokens = 16
  elif arg:
    raise ValueError(f"Unknown configs/arith_lab.py arg {arg!r}; use '' or 'smoke'")
  return c
