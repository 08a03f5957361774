r"""Evaluate a model directory on a dataset with K samples per problem.

  python -m qdc_jax.main --config=configs/evaluate.py --workdir=/tmp/qdc_eval
  python -m qdc_jax.main --config=configs/evaluate.py --workdir=/tmp/eval_gsm8k \
      --config.model_dir=/path/model --config.data.name=gsm8k --config.data.path=test.jsonl

Writes eval_report.json (greedy accuracy = maj@1, pass@k, maj@k, diversity per split),
eval_examples.json and pass_at_k.png. Arg: "" | "smoke" (tiny, for tests).
"""

import ml_collections

from qdc_jax import config_lib


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "evaluate"
  c.model_dir = ""  # a qdc_jax.model_io directory; '' = the shipped lab student
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  c.seed = 0  # sampling seed

  c.data = ml_collections.ConfigDict()
  c.data.name = "lab"  # 'lab' (in_dist + ood test splits) | gsm8k | math | svamp | aime
  c.data.path = ""  # JSONL / Parquet file for a real dataset
  c.data.size = 128  # problems per split (0 = all, real datasets)
  c.data.prompt_template = "Question: {question}\nSolution:\n"  # real datasets

  c.sampling = ml_collections.ConfigDict()
  c.sampling.k = 16  # samples per problem (plus one greedy)
  c.sampling.temperature = 1.0
  c.sampling.max_new_tokens = 160
  c.sampling.ks = (1, 2, 4, 8, 16)  # pass@k / maj@k budgets
  c.sampling.batch_size = 64  # prompts per sampler call (x k rows)
  # Texts that end a sample: a base model on real datasets would otherwise invent the next
  # "Question:" (the prompt template's); the lab models stop at <eos>.
  c.sampling.stop_strings = ()

  if arg == "smoke":
    c.data.size, c.sampling.k, c.sampling.ks = 8, 4, (1, 2, 4)
    c.sampling.max_new_tokens = 32
  elif arg:
    raise ValueError(f"Unknown configs/evaluate.py arg {arg!r}; use '' or 'smoke'")
  return c
