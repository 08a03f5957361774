"""A tiny Gemma-2 world for tests: tokenizer, random checkpoints in both formats, conversion.

  tok = tiny_gemma.make_tokenizer(tmp_path)                     # Gemma's ids, 192 pieces
  ckpt = tiny_gemma.make_kaggle_checkpoint(tmp_path / "k")      # or make_hf_checkpoint
  model_dir = tiny_gemma.convert(ckpt, tok, tmp_path / "model")
  cfg, params, tokenizer, meta, shardings = model_io.load_model(model_dir)

The tokenizer is a SentencePiece model trained offline on a few lines of text, with Gemma's
special ids: pad 0, eos 1, bos 2, unk 3, fillers at 4..105 (Gemma's <mask>, [multimodal],
<unused*>), <start_of_turn> 106, <end_of_turn> 107, "\\n" 108 (user-defined, so text encodes
to them, as in Gemma's tokenizer), then the learned pieces. The model is the `lab_tiny` shape
(2 layers, d_model 64; Kaggle import infers it from shapes), so sampling from it is fast.
Tables: HF has one row per piece (like 256000), Kaggle pads past the tokenizer (like 256128).
"""

from __future__ import annotations

import os

import flax.linen as nn
import numpy as np
from flax import traverse_util

from qdc_jax.models import configs, gemma_io

CONFIG_NAME = "lab_tiny"
TOKENIZER_PIECES = 192
KAGGLE_VOCAB = 256  # rows past the tokenizer, as Kaggle's 256128 vs 256000
HF_VOCAB = TOKENIZER_PIECES

TEXT = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? The answer is 72.
Weng earns 12 dollars an hour for babysitting. Yesterday, she did 50 minutes of babysitting.
Betty is saving money for a new wallet which costs 100 dollars. What is 3 + 4 * (5 - 2)?
You are a careful tutor. Solve the problem step by step. Digits: 0 1 2 3 4 5 6 7 8 9.
"""
# Gemma's pieces 4..105 (the real names do not matter, only that 106/107 land where Gemma's do).
FILLERS = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(100)]
TURN_PIECES = ["<start_of_turn>", "<end_of_turn>"]
GEMMA_IDS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)


def make_tokenizer(directory, *, name: str = "tokenizer", vocab_size: int = TOKENIZER_PIECES,
                   user_defined_symbols=None, ids=None) -> str:
  """Trains a tiny SentencePiece model; returns the path of `<directory>/<name>.model`.

  Args:
    directory: where the corpus and model go (created if needed).
    name: file name stem.
    vocab_size: pieces (the corpus supports up to ~210 with the default symbols).
    user_defined_symbols: default Gemma's: fillers, turn pieces, "\\n" (ids 4..108).
    ids: {pad_id, eos_id, bos_id, unk_id}; default Gemma's 0/1/2/3.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  corpus = os.path.join(directory, f"{name}.txt")
  with open(corpus, "w") as fh:
    fh.write(TEXT * 20)
  prefix = os.path.join(directory, name)
  symbols = FILLERS + TURN_PIECES + ["\n"] if user_defined_symbols is None else user_defined_symbols
  ids = dict(GEMMA_IDS if ids is None else ids)
  pieces = {"pad_id": "<pad>", "eos_id": "<eos>", "bos_id": "<bos>", "unk_id": "<unk>"}
  # No normalization and no dummy prefix, as Gemma's. "\n" is a piece of its own: the trainer
  # reads line by line and would never see it.
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
      character_coverage=1.0, **ids,
      **{k.replace("_id", "_piece"): v for k, v in pieces.items()},
      user_defined_symbols=symbols, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
  return prefix + ".model"


def model_config(vocab: int):
  """The tiny Gemma-2 config with `vocab` embedding rows (float32)."""
  return configs.get_model_config(CONFIG_NAME, vocab_size=vocab)


def kaggle_tree(cfg, *, fused: bool = False, nested: bool = False, seed: int = 0,
                scale: float = 1.0):
  """Random arrays in the Kaggle layout: (flat {name: array}, the tree to save).

  Flat names are 'layer_0/attn/q_einsum/w' etc.; the tree is as released ('transformer/<module
  path>' -> {param: array}) or, with `nested`, as `gemma.gm.ckpts.save_params` writes it.
  Norm scales are drawn like the other arrays (around zero, applied as 1 + scale).
  """
  rng = np.random.default_rng(seed)
  d, n, k, h, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)

  def r(*shape):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  flat = {"embedder/input_embedding": r(v, d), "final_norm/scale": r(d)}
  for i in range(cfg.num_layers):
    p = f"layer_{i}/"
    if fused:
      flat[p + "attn/qkv_einsum/w"] = r(3, n, d, h)
    else:
      flat[p + "attn/q_einsum/w"] = r(n, d, h)
      flat[p + "attn/kv_einsum/w"] = r(2, k, d, h)
    flat[p + "attn/attn_vec_einsum/w"] = r(n, h, d)
    flat[p + "mlp/gating_einsum/w"] = r(2, f, d)
    flat[p + "mlp/linear/w"] = r(f, d)
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      flat[p + norm + "/scale"] = r(d)
  if not nested:  # 'transformer/<module path>' -> {param: array}
    tree = {}
    for key, x in flat.items():
      module, param = key.rsplit("/", 1)
      tree.setdefault("transformer/" + module, {})[param] = x
    return flat, tree
  tree = {}
  for key, x in flat.items():
    parts = key.split("/")
    if parts[-2] in ("gating_einsum", "linear"):  # the nested layout has no 'w' under mlp
      parts = parts[:-1]
    node = tree
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = x
  return flat, tree


def save_orbax(tree, path) -> str:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.PyTreeCheckpointer().save(os.fspath(path), tree)
  return os.fspath(path)


def make_kaggle_checkpoint(directory, vocab: int = KAGGLE_VOCAB, *, seed: int = 0) -> str:
  """A random tiny Gemma-2 as a Kaggle/Flax orbax checkpoint (released flat layout)."""
  _, tree = kaggle_tree(model_config(vocab), seed=seed, scale=0.5)
  return save_orbax(tree, directory)


def random_params(cfg, *, seed: int = 0):
  """Our param tree for `cfg`: weights N(0, 0.25^2) (large enough that the soft-caps bite),
  norm scales U(-0.5, 0.5)."""
  abstract = traverse_util.flatten_dict(nn.meta.unbox(
      gemma_io._abstract_params(cfg)))  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in sorted(abstract.items()):
    if "norm" in "/".join(path):
      flat[path] = rng.uniform(-0.5, 0.5, leaf.shape).astype(np.float32)
    else:
      flat[path] = rng.normal(0.0, 0.25, leaf.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def make_hf_checkpoint(directory, vocab: int = HF_VOCAB, *, seed: int = 0,
                       dtype: str = "float32", **hf_config) -> str:
  """A random tiny Gemma-2 as a Hugging Face directory (config.json + model.safetensors) in
  `dtype`; `hf_config` entries are merged into config.json (e.g. eos_token_id=[1, 107])."""
  cfg = model_config(vocab)
  gemma_io.params_to_hf_safetensors(random_params(cfg, seed=seed), cfg, os.fspath(directory),
                                    dtype=dtype, extra_config=hf_config)
  return os.fspath(directory)


def convert(checkpoint, tokenizer, out, **kwargs) -> str:
  """`gemma_io.convert` (the `convert` command); returns the model directory."""
  gemma_io.convert(os.fspath(checkpoint), os.fspath(tokenizer), os.fspath(out), **kwargs)
  return os.fspath(out)


def converted_model(root, fmt: str = "kaggle") -> str:
  """Tokenizer + checkpoint in `fmt` + conversion under `root`; the model directory."""
  tok = make_tokenizer(os.path.join(root, "tok"))
  make = make_kaggle_checkpoint if fmt == "kaggle" else make_hf_checkpoint
  return convert(make(os.path.join(root, fmt)), tok, os.path.join(root, "model"))



# ------------------------------------------------------------------ the README's tiny world


def write_datasets(root, *, seed: int = 0, train: int = 24, test: int = 8) -> dict[str, str]:
  """GSM8K, MATH and AIME files from lab problems (real row formats, oracle answers).

  gsm8k_train/test.jsonl (question, answer: steps then '#### X'), math_train/test.jsonl
  (problem, solution ending in \\boxed{X}, level, type), aime.jsonl (problem, answer).
  """
  import json  # pylint: disable=g-import-not-at-top
  from qdc_jax.data import arith  # pylint: disable=g-import-not-at-top
  problems = arith.make_split("in_dist", train + test, seed)
  splits = {"train": problems[:train], "test": problems[train:]}
  rows = {}
  for split, ps in splits.items():
    steps = [p.solution.rsplit("\n", 1)[0] if "\n" in p.solution else "" for p in ps]
    rows[f"gsm8k_{split}"] = [{"question": p.text, "answer": f"{s}\n#### {p.answer}"}
                              for p, s in zip(ps, steps)]
    rows[f"math_{split}"] = [{"problem": p.text, "solution": f"{s}\nSo it is "
                              f"$\\boxed{{{p.answer}}}$.", "level": "Level 1",
                              "type": "Prealgebra"} for p, s in zip(ps, steps)]
  rows["aime"] = [{"problem": p.text, "answer": int(p.answer)} for p in splits["test"]]
  out = {}
  os.makedirs(root, exist_ok=True)
  for name, rs in rows.items():
    out[name] = os.path.join(root, f"{name}.jsonl")
    with open(out[name], "w") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in rs)
  return out


def make_world(root) -> dict[str, str]:
  """What the README's Gemma commands start from: root/tokenizer.model, root/kaggle (orbax),
  root/hf (safetensors + config.json), and the dataset files of `write_datasets`."""
  root = os.fspath(root)
  out = {"tokenizer": make_tokenizer(root),
         "kaggle": make_kaggle_checkpoint(os.path.join(root, "kaggle")),
         "hf": make_hf_checkpoint(os.path.join(root, "hf"), eos_token_id=[1, 107])}
  out.update(write_datasets(root))
  return out


if __name__ == "__main__":
  # python tests/tiny_gemma.py DIR: a tiny random Gemma-2 world (see make_world).
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 2:
    sys.exit("usage: python tests/tiny_gemma.py DIR")
  for key, value in make_world(sys.argv[1]).items():
    print(f"{key}: {value}")
