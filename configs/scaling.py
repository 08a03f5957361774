r"""Scaling laws from the intrinsic dimension of data (thesis chapter 2).

  python -m qdc_jax.main --config=configs/scaling.py --workdir=/tmp/qdc_scaling
  python -m qdc_jax.main --config=configs/scaling.py:gpt2 --workdir=gs://bucket/scaling \
      --config.corpora.owt.path='gs://bucket/openwebtext/*.txt' --config.train.batch_size=512

Args:
  ""        the lab (default), a reduced grid: three corpora (lab text, Tiny Shakespeare, the
            Python standard library) x 4 data sizes over 3 orders of magnitude (2^9..2^19
            bytes), 3 widths, the manifold check at d = 2, 4, 8; about 30 min on 2 CPU cores.
  lab_full  the whole lab grid (6 sizes 2^9..2^19, 4 widths, d = 2..16, 20k-step cap):
            40 min on 2 CPU cores (measured), in the background.
  gpt2      the thesis's runs: gpt2_125m, AdamW lr 6e-4 -> 6e-5, 2000 warmup steps + cosine,
            200k steps, global batch by flag, context 1024; corpora from flags (text files
            or TFDS datasets prepared offline), byte-level tokens.
  smoke     seconds per unit; what the tests run.

Early stopping: every run evaluates its valid loss every `train.eval_every` steps and stops
after `train.patience` evaluations without improvement; checkpoints are saved at each
evaluation and `train.keep` = patience + 1 of them are kept, so the best step's params are
still there for the test loss.
"""

import ml_collections

from qdc_jax import config_lib
from qdc_jax import fit
from qdc_jax.scaling import corpora

_ARGS = ("", "lab", "lab_full", "gpt2", "smoke")


def _train(steps, lr, warmup, eval_every, patience, batch, seq_len):
  t = fit.default_train_config()
  t.steps, t.batch_size, t.seq_len = steps, batch, seq_len
  t.eval_every, t.patience = eval_every, patience
  t.save_every, t.keep = eval_every, patience + 1
  t.log_every = eval_every
  t.opt.lr, t.opt.warmup_steps, t.opt.final_lr_ratio = lr, warmup, 0.1
  t.async_checkpoint = False  # many short runs: a save per evaluation, each small
  return t


def get_config(arg: str = ""):
  if arg not in _ARGS:
    raise ValueError(f"Unknown configs/scaling.py arg {arg!r}; use one of {_ARGS}")
  preset = {"": "lab"}.get(arg, arg)
  c = ml_collections.ConfigDict()
  c.experiment = "scaling"  # qdc_jax.registry experiment name
  c.preset = preset
  c.mesh = config_lib.mesh_section((-1, 1, 1))
  # GPT-2 architecture (LayerNorm, GELU, learned positions, tied embeddings), byte vocabulary.
  c.model = config_lib.model_section("gpt2_tiny", vocab_size=264, max_len=1024)
  c.widths = (32, 64, 128)  # d_model of the width sweep (head_dim kept, d_ff = 4 d)
  c.width_corpus = "lab"
  c.corpus_order = ("lab", "shakespeare", "python_stdlib")
  c.corpora = ml_collections.ConfigDict({
      "lab": corpora.section("lab"),
      "shakespeare": corpora.section("shakespeare", doc_bytes=1024),
      "python_stdlib": corpora.section("python_stdlib"),
  })
  c.data = ml_collections.ConfigDict()
  c.data.sizes = (2**9, 2**12, 2**15, 2**19)  # training tokens (bytes) per run: nested
  c.data.valid_tokens = 2**14  # early stopping
  c.data.test_tokens = 2**15  # the reported loss
  c.data.seed = 0  # document order of the stream every size is a prefix of
  c.train = _train(steps=2000, lr=2e-3, warmup=100, eval_every=100, patience=3, batch=16,
                   seq_len=64)
  c.id = ml_collections.ConfigDict(dict(
      k=20,  # MLE neighbours
      per_doc=32,  # tokens drawn per document (thesis)
      context=64,  # window per document (the thesis's 1024 = GPT-2's context; here seq_len)
      batch=4096,  # points per estimate, estimates averaged (thesis)
      layers="all",  # "all": the layer ablation too; "" = final layer only
      position_buckets=4,
      max_docs=2048,  # test documents embedded (0 = all)
      seed=0))
  c.manifold = ml_collections.ConfigDict(dict(
      dims=(2, 4, 8), sizes=(256, 1024, 4096, 16384), ambient=48, chunks=8,
      valid_points=1024, test_points=4096, id_points=8192, seed=0))
  c.manifold.model = config_lib.model_section("lab_tiny", max_len=64)
  c.manifold.train = _train(steps=2000, lr=1e-3, warmup=100, eval_every=100, patience=3,
                            batch=64, seq_len=8)

  if preset == "lab_full":
    c.data.sizes = (2**9, 2**11, 2**13, 2**15, 2**17, 2**19)
    c.widths = (32, 64, 128, 256)
    c.manifold.dims = (2, 4, 8, 16)
    c.manifold.sizes = (256, 1024, 4096, 16384, 65536)
    c.train.steps = c.manifold.train.steps = 20000
  elif preset == "gpt2":
    c.model = config_lib.model_section("gpt2_125m", vocab_size=264)
    c.widths = (192, 384, 768)
    c.width_corpus = "owt"
    c.corpus_order = ("owt", "tinystories", "stack_sql")
    c.corpora = ml_collections.ConfigDict({
        "owt": corpora.section("files", path=""),  # --config.corpora.owt.path=GLOB
        "tinystories": corpora.section("files", path=""),
        "stack_sql": corpora.section("files", path=""),
    })
    c.data.sizes = (2**20, 2**23, 2**26, 2**29)
    c.data.valid_tokens, c.data.test_tokens = 2**20, 2**22
    c.train = _train(steps=200_000, lr=6e-4, warmup=2000, eval_every=2000, patience=3,
                     batch=512, seq_len=1024)
    c.train.opt.final_lr_ratio = 0.1  # 6e-4 -> 6e-5
    c.train.async_checkpoint = True
    c.id.context = 1024
    c.id.max_docs = 0
    c.mesh.shape = (-1, 1, 1)
  elif preset == "smoke":
    c.widths = (32, 48, 64)  # three: a fit with an uncertainty
    c.corpus_order = ("lab",)  # units compile their steps: few units keep it under a minute
    c.corpora.lab.lab_docs = 2000
    c.data.sizes = (2**9, 2**10, 2**11)
    c.data.valid_tokens, c.data.test_tokens = 2**10, 2**10
    c.train = _train(steps=20, lr=2e-3, warmup=5, eval_every=10, patience=1, batch=8,
                     seq_len=32)
    c.id.update(context=32, per_doc=8, batch=256, position_buckets=1, max_docs=64, layers="")
    c.manifold.update(dims=(2,), sizes=(64, 128, 256), ambient=16, chunks=4,
                      valid_points=64, test_points=64, id_points=512)
    c.manifold.train = _train(steps=20, lr=1e-3, warmup=5, eval_every=10, patience=1,
                              batch=16, seq_len=4)
  return c
