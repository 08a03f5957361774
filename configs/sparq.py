r"""SPARQ: quality-diversity generation of math problems, then distillation into the student.

  python -m qdc_jax.main --config=configs/sparq.py --workdir=/tmp/sparq          # the lab
  python -m qdc_jax.main --config=configs/sparq.py:gemma --workdir=gs://b/sparq \
      --config.generator.model_dir=/ckpt/gemma-2-27b-it-qdc \
      --config.student.model_dir=/ckpt/gemma-2-9b-math-sft \
      --config.student.tokenizer_path=/ckpt/tokenizer.model \
      --config.generator.tokenizer_path=/ckpt/tokenizer.model \
      --config.annotator.model_dir=/ckpt/gemma-2-9b-it-qdc \
      --config.annotator.tokenizer_path=/ckpt/tokenizer.model \
      --config.data.seed_path=/data/math/train.jsonl \
      --config.eval.in_dist_path=/data/math/test.jsonl --config.eval.ood_path=/data/aime.jsonl
  python -m qdc_jax.main --config=configs/sparq.py:self_improve --workdir=/tmp/sparq_self

Model directories are `qdc_jax.model_io` directories (convert a Gemma checkpoint with
`qdc_jax.models.gemma_io.load_gemma` + `model_io.save_model`). Strategies: static_uniform,
static_diverse, dynamic_uniform, dynamic_diverse (`--config.sparq.strategy=...`; compare all
four with launch/sparq_strategies.sh).

Args: "" / "lab" (default, <= 15 min on 2 CPU cores) | "gemma" (thesis numbers) |
"self_improve" (generator = student) | "smoke" (seconds, for tests).
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax import fit


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "sparq"
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.prompt_format = "lab"  # 'lab' (plain lab templates) | 'gemma_chat' (instruction models)

  c.sparq = ml_collections.ConfigDict()
  c.sparq.strategy = "static_uniform"  # static_uniform|static_diverse|dynamic_uniform|dynamic_diverse
  c.sparq.rounds = 12  # generation rounds (thesis: 5000)
  c.sparq.parents_per_round = 32  # b (thesis: 64)
  c.sparq.k = 16  # student verifications per child (thesis: 16)
  c.sparq.t_low = 0.1  # QUALITY band on the solve rate, inclusive (thesis: 0.1, 0.9)
  c.sparq.t_high = 0.9
  c.sparq.num_skills = 100  # M: skill vocabulary = the M most common seed skills
  c.sparq.max_skills_per_problem = 3  # k: skills per skill-set
  c.sparq.working_set_size = 256  # T of dynamic_uniform
  c.sparq.niche_limit = 8  # per-niche population of dynamic_diverse (MAP-Elites)
  c.sparq.seed = 0  # selection and sampling randomness (per round: (seed, round))

  c.generator = ml_collections.ConfigDict()
  c.generator.model_dir = ""  # '' = the shipped lab generator (qdc_jax/assets/lab_generator)
  c.generator.tokenizer_path = ""  # SentencePiece model for non-lab models
  c.generator.same_as_student = False  # self-improvement: the student also generates
  c.generator.temperature = 1.0
  c.generator.max_new_tokens = 320

  c.student = ml_collections.ConfigDict()
  c.student.model_dir = ""  # '' = the shipped lab student (qdc_jax/assets/lab_student)
  c.student.tokenizer_path = ""
  c.student.temperature = 1.0  # verification sampling temperature
  c.student.max_new_tokens = 160
  # > 0: verification rollouts stream through this many decode rows (sampling.sample_stream;
  # the same samples). Off: on the lab, rows end within ~1.5x of the mean and the plain
  # sampler is as fast on CPU (docs/benchmarks.md); pays when lengths spread (long budgets).
  c.student.slots = 0

  c.annotator = ml_collections.ConfigDict()
  c.annotator.kind = "oracle"  # 'oracle' (lab: exact skills) | 'lm'
  c.annotator.model_dir = ""  # instruction model for kind 'lm' (thesis: Gemma-2-9b-it)
  c.annotator.tokenizer_path = ""

  c.data = ml_collections.ConfigDict()
  c.data.seed_source = "lab"  # 'lab' | 'math' (a MATH train file) | gsm8k | svamp | aime
  c.data.seed_path = ""  # JSONL/Parquet seed set for non-lab sources
  c.data.num_seeds = 512  # seed problems (0 = all)
  c.data.seed = 0  # which lab seed problems

  c.phase2 = ml_collections.ConfigDict()
  c.phase2.filter = "none"  # 'none' (all QUALITY > 0) | quality | diversity | qd | random
  c.phase2.budget = 4096  # N for the filters (thesis: 2^12 .. 2^15)
  c.phase2.quality_mean = 0.6  # m of the quality filter's Gaussian (sd 0.1)

  # Distillation: thesis 1 epoch, lr 2e-6 cosine to 2e-7, batch 16 (full scale); scaled up
  # for the tiny lab student, which needs larger steps to move in a few hundred updates.
  c.distill = fit.default_train_config()
  c.distill.steps = 150  # -1 = one epoch over the phase-2 pairs
  c.distill.batch_size = 16
  c.distill.seq_len = 256
  c.distill.pack = True
  c.distill.log_every = 25
  c.distill.save_every = 50
  c.distill.opt.lr = 5e-4
  c.distill.opt.warmup_steps = 10
  c.distill.opt.final_lr_ratio = 0.1

  c.eval = ml_collections.ConfigDict()
  c.eval.test_size = 128  # problems per split (lab test splits; real: first N, 0 = all)
  c.eval.k = 16  # OOD pass@n for n up to this (thesis: 96)
  c.eval.temperature = 1.0
  c.eval.in_dist_path = ""  # gemma: MATH test file
  c.eval.ood_path = ""  # gemma: AIME file

  if arg in ("", "lab"):
    pass
  elif arg == "gemma":
    c.prompt_format = "gemma_chat"
    c.mesh.shape = (-1, 1, 8)  # data x tensor; e.g. a v4-32 slice
    c.sparq.rounds, c.sparq.parents_per_round, c.sparq.k = 5000, 64, 16
    c.sparq.num_skills, c.sparq.max_skills_per_problem = 100, 3
    c.sparq.working_set_size = 7500
    c.generator.max_new_tokens, c.student.max_new_tokens = 1024, 1024
    c.annotator.kind = "lm"
    c.data.seed_source, c.data.num_seeds = "math", 0
    c.phase2.budget = 32768
    c.distill.steps, c.distill.batch_size, c.distill.seq_len = -1, 16, 2048  # one epoch
    c.distill.opt.lr, c.distill.opt.final_lr_ratio, c.distill.opt.warmup_steps = 2e-6, 0.1, 100
    c.eval.test_size, c.eval.k = 0, 96
  elif arg == "self_improve":
    c.generator.same_as_student = True
  elif arg == "smoke":
    c.sparq.rounds, c.sparq.parents_per_round, c.sparq.k = 3, 8, 4
    c.data.num_seeds = 32
    # Long enough for whole children and solutions: a smoke run must reach distillation.
    c.generator.max_new_tokens, c.student.max_new_tokens = 256, 96
    c.distill.steps, c.distill.batch_size, c.distill.seq_len = 4, 4, 128
    c.distill.log_every, c.distill.save_every = 2, 2
    c.eval.test_size, c.eval.k = 8, 4
  else:
    raise ValueError(f"Unknown configs/sparq.py arg {arg!r}; use lab, gemma, self_improve or "
                     f"smoke")
  return c
