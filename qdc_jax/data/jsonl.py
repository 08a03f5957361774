"""JSONL files: (prompt, completion) records with errors that name file, line and field, and
atomic writes of any rows (a kill leaves the old file or the whole new one, never half)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import jax


def write_atomic(path: str, text: str) -> None:
  """Write `text` to `path` through a fsynced temp file and a rename (process 0 only)."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_rows(path: str, rows: Iterable[Any]) -> None:
  """One JSON value per line, atomically."""
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_rows(path: str) -> Optional[list]:
  """The rows of a JSONL file; None when it does not exist."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_records(path: str, prompt_key: str = "prompt",
                 completion_key: str = "completion") -> list[dict]:
  """Rows of a JSONL file as {'prompt', 'completion'} dicts."""
  out = []
  try:
    f = open(path, encoding="utf-8")
  except FileNotFoundError:
    raise FileNotFoundError(f"No such data file: {path} (set --config.data.train_path / "
                            f"eval_path)") from None
  with f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
      for key in (prompt_key, completion_key):
        if key not in row:
          raise ValueError(f"{path}:{i}: missing field {key!r} (fields: {sorted(row)})")
        if not isinstance(row[key], str):
          raise ValueError(f"{path}:{i}: field {key!r} must be a string, got "
                           f"{type(row[key]).__name__}")
      out.append({"prompt": row[prompt_key], "completion": row[completion_key]})
  return out
