r"""Train the lab's models from scratch with the core trainer.

  python -m qdc_jax.main --config=configs/arith_lab.py --workdir=/tmp/qdc_lab
  python -m qdc_jax.main --config=configs/arith_lab.py:student --workdir=/tmp/lab_student
  python -m qdc_jax.main --config=configs/arith_lab.py:generator --workdir=/tmp/lab_generator

Args:
  ""            a quick student (minutes on 2 CPU cores): the README's main job for now.
  student       the shipped student (qdc_jax/assets/lab_student): question -> solution.
  generator     the shipped generator (qdc_jax/assets/lab_generator): parent -> child.
  smoke, generator_smoke   seconds; what the tests run.
Each run exports its params to <workdir>/model and measures them (report.json).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax import fit


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "lm"  # qdc_jax.registry experiment name
  c.model = config_lib.model_section("lab_tiny")  # a named model; fields override it
  c.init_from = ""  # model directory (or "asset:NAME") to fine-tune; "" = from scratch
  c.mesh = config_lib.mesh_section((-1, 1, 1))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "char"  # 'char' (lab alphabet) | 'sentencepiece'
  c.tokenizer.path = ""  # SentencePiece model file when kind == 'sentencepiece'

  c.data = ml_collections.ConfigDict()
  c.data.source = "arith"  # 'arith' (the lab) | 'jsonl'
  c.data.task = "student"  # lab task: 'student' | 'generator'
  c.data.seed = 0  # which lab problems
  c.data.train_size = 20_000  # lab training problems (generator: parents)
  c.data.bridge_fraction = 0.1  # share of 3-4 op, up-to-3-digit problems in training
  c.data.eval_size = 256  # held-out problems for eval loss
  c.data.test_size = 128  # test problems per split, never trained on
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
  c.eval.test_size = 128  # test problems per split measured after training
  c.eval.k = 16  # samples per problem for pass@k (student)
  c.eval.max_new_tokens = 160  # completion budget

  if arg in ("student", "generator"):
    c.model.name = f"lab_{arg}"
    c.data.task = arg
    c.train.pack = True  # ~4k tokens per step either way
    c.train.batch_size = 16 if arg == "student" else 8
    c.train.seq_len = 256 if arg == "student" else 512
    c.train.steps = 800 if arg == "student" else 500
    c.train.save_every = 100
    c.train.opt.lr = 3e-3
    c.train.opt.warmup_steps = 50
    if arg == "generator":
      # The generator starts from the student: it must solve its own children to state a
      # correct intended answer, and learning arithmetic from scratch is the slow part.
      c.init_from = "asset:lab_student"
      c.train.opt.lr = 1e-3
      c.eval.max_new_tokens = 320
  elif arg in ("smoke", "generator_smoke"):
    c.model.name = "lab_tiny"
    c.data.task = "student" if arg == "smoke" else "generator"
    c.data.train_size, c.data.eval_size, c.data.test_size = 256, 16, 16
    c.train.steps, c.train.batch_size, c.train.seq_len = 6, 8, 128
    c.train.log_every, c.train.save_every = 2, 3
    c.train.opt.warmup_steps = 2
    c.eval.test_size, c.eval.k, c.eval.max_new_tokens = 8, 4, 16
  elif arg:
    raise ValueError(f"Unknown configs/arith_lab.py arg {arg!r}; use '', 'student', "
                     f"'generator', 'smoke' or 'generator_smoke'")
  return c
