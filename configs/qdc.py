r"""QDC measures (quality, diversity, complexity) of any datasets, side by side.

  python -m qdc_jax.main --config=configs/qdc.py --workdir=/tmp/qdc       # lab in_dist vs ood
  python -m qdc_jax.main --config=configs/qdc.py --workdir=/tmp/qdc_sparq \
      --config.data.paths=/tmp/sparq/static_uniform,/tmp/sparq/dynamic_diverse/phase2.jsonl
  python -m qdc_jax.main --config=configs/qdc.py:gemma --workdir=gs://b/qdc \
      --config.data.paths=gs://b/gsm8k/train.jsonl,gs://b/sparq/archive \
      --config.embed.model_dir=gs://b/models/gemma2_2b --config.skills.model_dir=...

Paths (comma-separated): SPARQ workdirs or archive directories, phase2.jsonl, EI
round_i/dataset.jsonl, GSM8K / MATH / SVAMP / AIME JSONL or Parquet, any rows with
question[/solution/answer], or lab:SPLIT[:N]. Kinds are detected (`--config.data.kinds` to
name them, one per path). Definitions: qdc_jax/qdc/profile.py.

Args: "" (default: lab in_dist vs ood, or --config.data.paths; student solve rates opt-in
with --config.student.enabled) | "lab" (the same with the lab student's solve rates on) |
"gemma" (real models from flags) | "smoke" (seconds, for tests).
"""

import ml_collections

from qdc_jax import config_lib


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "qdc"
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.seed = 0  # every sample (rows, student rows, rollouts, nearest-neighbour subset)
  c.prompt_format = "lab"  # how the student / ORM see a question: 'lab' | 'gemma_chat'

  c.data = ml_collections.ConfigDict()
  c.data.paths = "lab:in_dist:256,lab:ood:256"
  c.data.kinds = ""  # one per path (auto|archive|phase2|records|qa|lab|gsm8k|math|svamp|aime)
  c.data.names = ""  # one label per path ('' = from the paths)
  c.data.max_rows = 0  # per dataset: 0 = every row, else a seeded sample of this many

  c.skills = ml_collections.ConfigDict()
  # auto: the lab oracle when most questions are lab problems, else the rows' recorded
  # skill-sets (SPARQ), else none. 'lm': an instruction model names them (skills.model_dir).
  c.skills.annotator = "auto"
  c.skills.model_dir = ""
  c.skills.tokenizer_path = ""
  c.skills.num_skills = 100  # vocabulary: the M most common skills over all datasets
  c.skills.k = 3  # skills per skill-set

  c.embed = ml_collections.ConfigDict()
  c.embed.model_dir = ""  # '' = the shipped lab student; 'none' = no embedding measures
  c.embed.tokenizer_path = ""
  c.embed.layer = -1  # -1 = final (after the final norm); 0..num_layers-1 = residual stream
  c.embed.field = "question"  # question | solution | question_solution
  c.embed.max_tokens = 0  # tokens embedded per row (0 = the model's max_len)
  c.embed.batch_size = 64
  c.embed.nn_max_rows = 20000  # nearest-neighbour distance on a seeded sample above this

  c.student = ml_collections.ConfigDict()
  c.student.enabled = False  # opt-in: K rollouts per sampled row (the SPARQ verifier)
  c.student.model_dir = ""  # '' = the shipped lab student
  c.student.tokenizer_path = ""
  c.student.k = 8
  c.student.max_rows = 256  # rows solved per dataset (seeded sample; 0 = all)
  c.student.temperature = 1.0
  c.student.max_new_tokens = 160
  c.student.batch_size = 64
  c.student.t_low = 0.1  # SPARQ's QUALITY band
  c.student.t_high = 0.9

  c.orm = ml_collections.ConfigDict()
  c.orm.model_dir = ""  # opt-in: a reward-model directory (e.g. GLORE_DIR/orm/model)

  if arg == "":
    pass
  elif arg == "lab":
    c.student.enabled = True
    c.student.max_rows = 128
  elif arg == "gemma":
    c.prompt_format = "gemma_chat"
    c.mesh.shape = (-1, 1, 8)
    c.data.paths = ""  # from flags
    c.skills.annotator = "lm"
    c.embed.max_tokens, c.embed.batch_size = 1024, 32  # Gemma's max_len is 8192
    c.student.max_new_tokens, c.student.k = 1024, 16
  elif arg == "smoke":
    c.data.paths = "lab:in_dist:24,lab:ood:24"
    c.student.enabled = True
    c.student.max_rows, c.student.k, c.student.max_new_tokens = 6, 2, 96
  else:
    raise ValueError(f"Unknown configs/qdc.py arg {arg!r}; use lab, gemma or smoke")
  return c
