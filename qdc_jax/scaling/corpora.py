"""Text corpora for the scaling chapter, as documents split into train / valid / test.

Available with no network (the lab default), in order of complexity:

- `lab`: the arithmetic lab's problem + step-by-step solution texts (synthetic, like
  TinyStories): generated, one problem per document;
- `shakespeare`: Tiny Shakespeare, shipped gzipped in `qdc_jax/assets/corpora` (public domain,
  see its README), cut into documents of `doc_bytes` bytes;
- `python_stdlib`: the Python standard library's `.py` files that ship with the interpreter
  (like The Stack), one file per document; the Python version and a sha256 of the files used
  are recorded, since another interpreter ships other files.

At full scale, by flag: `files` (any local or gs:// glob of .txt files, one document per file,
or .jsonl files with a `text_field`) and `tfds` (a TFDS dataset prepared in `data_dir`, read
through `tfds.data_source`, one document per example's `text_field`).

Every corpus is tokenised byte-level (`tokenizers.ByteTokenizer`: no tokenizer to train or
download, the same vocabulary for all, losses in nats per byte). The split is by a hash of
each document's name, so it does not move when documents are added or reordered.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import sys
import sysconfig
from typing import Sequence

import ml_collections
import numpy as np

from qdc_jax import storage
from qdc_jax import tokenizers

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KINDS = ("lab", "shakespeare", "python_stdlib", "files", "tfds")


@dataclasses.dataclass(frozen=True)
class Corpus:
  name: str
  train: list[str]
  valid: list[str]
  test: list[str]
  provenance: dict  # source, version, hash, license, tokenizer: goes into the report


def section(kind: str, **fields) -> ml_collections.ConfigDict:
  """A corpus entry of `configs/scaling.py` (`config.corpora.<name>`)."""
  c = ml_collections.ConfigDict()
  c.kind = kind  # one of KINDS
  c.path = ""  # files: glob; tfds: dataset name (e.g. "tiny_stories:1.0.0")
  c.split = "train"  # tfds: the split read (all three of ours are cut out of it)
  c.data_dir = ""  # tfds: where it was prepared
  c.text_field = "text"  # jsonl files / tfds: the field holding the text
  c.max_docs = 0  # 0 = all documents
  c.doc_bytes = 4096  # shakespeare: bytes per document
  c.lab_docs = 20000  # lab: problems generated
  c.valid_fraction = 0.05
  c.test_fraction = 0.1
  c.update(fields)
  return c


def _split_of(name: str, valid: float, test: float) -> str:
  u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32
  return "test" if u < test else "valid" if u < test + valid else "train"


def _stdlib_docs() -> tuple[list[tuple[str, str]], dict]:
  root = sysconfig.get_paths()["stdlib"]
  named = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
    for f in sorted(filenames):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        with open(path, "rb") as fh:
          named.append((os.path.relpath(path, root), fh.read().decode("utf-8", "replace")))
  h = hashlib.sha256()
  for rel, text in named:
    h.update(rel.encode() + b"\0" + text.encode() + b"\0")
  return named, {"source": f"Python standard library at {root}", "python": sys.version,
                 "files": len(named), "sha256": h.hexdigest(),
                 "license": "PSF License (the interpreter's)"}


def _shakespeare_docs(doc_bytes: int) -> tuple[list[tuple[str, str]], dict]:
  from qdc_jax import model_io  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_io.asset_path("corpora"), "tinyshakespeare.txt.gz")
  with open(path, "rb") as fh:
    raw = gzip.decompress(fh.read())
  digest = hashlib.sha256(raw).hexdigest()
  if digest != SHAKESPEARE_SHA256:
    raise ValueError(f"{path} has sha256 {digest}, not {SHAKESPEARE_SHA256}: the shipped "
                     f"corpus is damaged; restore it from git")
  text = raw.decode("utf-8")
  docs = [(f"chunk_{i:05d}", text[s:s + doc_bytes])
          for i, s in enumerate(range(0, len(text), doc_bytes))]
  return docs, {"source": "Tiny Shakespeare (karpathy/char-rnn@6f9487a, shipped)",
                "sha256": digest, "license": "public domain text (repository MIT)"}


def _lab_docs(n: int) -> tuple[list[tuple[str, str]], dict]:
  from qdc_jax.data import lab_tasks  # pylint: disable=g-import-not-at-top
  problems = lab_tasks.student_problems(n, seed=0)
  docs = [(p.text, r["prompt"] + r["completion"]) for p, r in
          ((p, p.to_record()) for p in problems)]
  docs = list(dict(docs).items())  # a repeated problem is one document (one split)
  return docs, {"source": f"arithmetic lab, {n} in-distribution problems, seed 0",
                "license": "generated"}


def _file_docs(pattern: str, field: str) -> tuple[list[tuple[str, str]], dict]:
  paths = storage.glob(pattern)
  if not paths:
    raise ValueError(f"corpus path {pattern!r} matches no file")
  docs = []
  for p in sorted(paths):
    if p.endswith(".jsonl"):
      for i, row in enumerate(storage.read_rows(p) or [], 1):
        if not isinstance(row, dict) or field not in row:
          raise ValueError(f"{p}: row {i} has no field {field!r} (set text_field)")
        docs.append((f"{p}:{i}", str(row[field])))
    else:
      docs.append((p, storage.read_text(p)))
  return docs, {"source": pattern, "files": len(paths)}


def _tfds_docs(name: str, split: str, data_dir: str, field: str
               ) -> tuple[list[tuple[str, str]], dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
                     f"data_dir={data_dir!r} in array_record format: prepare it on a machine "
                     f"with network (tfds build --file_format=array_record) and pass its "
                     f"data_dir ({type(e).__name__}: {e})") from None
  docs = []
  for i in range(len(source)):
    row = source[i]
    if field not in row:
      raise ValueError(f"TFDS {name} example {i} has no field {field!r}; fields: "
                       f"{sorted(row)}; set text_field")
    v = row[field]
    docs.append((f"{name}/{split}/{i}", v.decode("utf-8", "replace") if isinstance(
        v, bytes) else str(v)))
  return docs, {"source": f"tfds {name} {split} at {data_dir}"}


def load(name: str, c: ml_collections.ConfigDict) -> Corpus:
  if c.kind == "lab":
    docs, prov = _lab_docs(c.lab_docs)
  elif c.kind == "shakespeare":
    docs, prov = _shakespeare_docs(c.doc_bytes)
  elif c.kind == "python_stdlib":
    docs, prov = _stdlib_docs()
  elif c.kind == "files":
    docs, prov = _file_docs(c.path, c.text_field)
  elif c.kind == "tfds":
    docs, prov = _tfds_docs(c.path, c.split, c.data_dir, c.text_field)
  else:
    raise ValueError(f"corpus {name!r}: unknown kind {c.kind!r}; choose one of {KINDS}")
  if c.max_docs:
    docs = docs[:c.max_docs]
  parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
  for doc_name, text in docs:
    if text:
      parts[_split_of(doc_name, c.valid_fraction, c.test_fraction)].append(text)
  for split, d in parts.items():
    if not d:
      raise ValueError(f"corpus {name!r} has no {split} document ({len(docs)} documents); "
                       f"use more documents or larger valid/test fractions")
  prov = {**prov, "kind": c.kind, "tokenizer": "byte-level (UTF-8)",
          "documents": {k: len(v) for k, v in parts.items()},
          "bytes": {k: int(sum(len(t.encode()) for t in v)) for k, v in parts.items()}}
  return Corpus(name, parts["train"], parts["valid"], parts["test"], prov)


def token_stream(docs: Sequence[str], tokenizer: tokenizers.Tokenizer, *, max_tokens: int,
                 seed: int) -> np.ndarray:
  """Documents in a seeded order, each as [bos] + tokens + [eos], concatenated, cut at
  `max_tokens`: data sets of growing size are prefixes of one stream (nested, as in the
  thesis). Raises if the documents hold fewer tokens."""
  order = np.random.default_rng(seed).permutation(len(docs))
  out, total = [], 0
  for i in order:
    ids = tokenizer.encode(docs[i], add_bos=True, add_eos=True)
    out.append(np.asarray(ids, np.int32))
    total += len(ids)
    if total >= max_tokens:
      break
  if total < max_tokens:
    raise ValueError(f"{len(docs)} documents hold {total} tokens, fewer than the "
                     f"{max_tokens} asked for; lower the data sizes or add documents")
  return np.concatenate(out)[:max_tokens]


def document_tokens(docs: Sequence[str], tokenizer: tokenizers.Tokenizer) -> list[list[int]]:
  """Per-document token lists (for the intrinsic-dimension sample)."""
  return [tokenizer.encode(d, add_bos=True) for d in docs]
