"""JSONL (prompt, completion) records, with errors that name file, line and field.

Writing rows, and reading them back, is the storage layer's (`qdc_jax.storage.write_rows`,
`read_rows`): one atomic write for every file the project makes, local or gs://.
"""

from __future__ import annotations

import json

from qdc_jax import storage


def read_objects(path: str) -> list[tuple[str, dict]]:
  """(where, row) for every JSON object line of a JSONL file ("path:line"); a line that is
  not a JSON object is an error naming file and line."""
  out = []
  for i, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
    out.append((f"{path}:{i}", row))
  return out


def read_records(path: str, prompt_key: str = "prompt",
                 completion_key: str = "completion") -> list[dict]:
  """Rows of a JSONL file as {'prompt', 'completion'} dicts."""
  out = []
  if not storage.exists(path):
    raise FileNotFoundError(f"No such data file: {path} (set --config.data.train_path / "
                            f"eval_path)")
  for where, row in read_objects(path):
    for key in (prompt_key, completion_key):
      if key not in row:
        raise ValueError(f"{where}: missing field {key!r} (fields: {sorted(row)})")
      if not isinstance(row[key], str):
        raise ValueError(f"{where}: field {key!r} must be a string, got "
                         f"{type(row[key]).__name__}")
    out.append({"prompt": row[prompt_key], "completion": row[completion_key]})
  return out
