"""The one storage layer: every path the project reads or writes goes through here (etils.epath).

So a workdir, a checkpoint, a model directory or a dataset may be a local folder or a `gs://`
bucket prefix (epath's fsspec/gcsfs backend, or TensorFlow's gfile where TensorFlow is
installed). Orbax checkpoints use epath too.

Writes are collective: every process calls `write_text` / `write_json` / `commit` with the
same arguments, exactly one process (0) writes, and a barrier follows, so a process that reads
the file afterwards always sees the whole of it. Reads may be done by any process.

Commit rules (the atomic write lives here once):
  * One file: on a local disk, a fsynced temp file renamed over the target; on an object
    store a single object upload is already atomic (it appears whole or not at all), and a
    rename there is a copy, so the object is written in place.
  * A directory of several files (a model directory, an archive round): its files are written
    first and one small file last (a model directory's model.json, an archive round's record);
    readers only trust what that last file vouches for, and deleting it first un-commits a
    directory about to be replaced.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable, Optional, Union

import jax

# gs:// through gcsfs (epath's fsspec backend), the path the tests run against an emulator,
# also where TensorFlow is installed (epath would pick tf.io.gfile there). Set
# EPATH_USE_TF=true to have gfile instead. Read when the first gs:// path is used.
os.environ.setdefault("EPATH_USE_TF", "false")
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

PathLike = Union[str, os.PathLike, epath.Path]


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def join(base: PathLike, *parts: str) -> str:
  """`base/part/...` as a string (keeps the gs:// scheme)."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def is_local(p: PathLike) -> bool:
  return "://" not in os.fspath(p)


def is_writer() -> bool:
  """True on the one process that writes shared files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (a no-op on one process). Every process must call it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def makedirs(p: PathLike) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """Names in a directory (sorted); [] when it does not exist."""
  d = epath.Path(p)
  if not d.exists():
    return []
  return sorted(c.name for c in d.iterdir())


def is_file(p: PathLike) -> bool:
  return epath.Path(p).is_file()


def glob(pattern: PathLike) -> list[str]:
  """Paths matching a glob pattern (sorted), local or gs://; the wildcards may be in any
  component after the first ('gs://b/data/train-*.parquet', '/data/*/test.jsonl')."""
  pattern = os.fspath(pattern)
  scheme, sep, rest = pattern.rpartition("://")
  parts = rest.split("/")
  first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
  if first is None:
    return [pattern] if exists(pattern) else []
  base = scheme + sep + ("/".join(parts[:first]) or ("/" if rest.startswith("/") else "."))
  return sorted(os.fspath(m) for m in epath.Path(base).glob("/".join(parts[first:])))


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
  return epath.Path(p).read_bytes()


def read_json(p: PathLike, default: Any = None) -> Any:
  """The JSON value in `p`; `default` when the file does not exist."""
  f = epath.Path(p)
  if not f.exists():
    return default
  return json.loads(f.read_text(encoding="utf-8"))


def _write_one(p: epath.Path, data: bytes) -> None:
  if is_local(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{os.fspath(p)}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.fspath(p))
    fd = os.open(os.fspath(p.parent), os.O_RDONLY)  # the rename itself durable
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  else:
    p.write_bytes(data)  # one object upload: atomic on object stores


def write_bytes(p: PathLike, data: bytes, *, sync: bool = True) -> None:
  """Atomically replace `p` with `data` (process 0 writes), between two barriers when `sync`.

  The first barrier lets every process finish what it read before the write (so "read; if
  absent, make and write" gives every process the same verdict), the second makes the write
  visible to all before any reads it.
  """
  if sync:
    barrier(f"before-write:{os.fspath(p)}")
  if is_writer():
    _write_one(epath.Path(p), data)
  if sync:
    barrier(f"write:{os.fspath(p)}")


def write_text(p: PathLike, text: str, *, sync: bool = True) -> None:
  write_bytes(p, text.encode("utf-8"), sync=sync)


def write_json(p: PathLike, value: Any, *, sync: bool = True, indent: Optional[int] = 2,
               default=None) -> None:
  write_text(p, json.dumps(value, indent=indent, default=default), sync=sync)


def write_rows(p: PathLike, rows: Iterable[Any], *, sync: bool = True) -> None:
  """A JSONL file (one JSON value per line), atomically."""
  write_text(p, "".join(json.dumps(r) + "\n" for r in rows), sync=sync)


def read_rows(p: PathLike) -> Optional[list]:
  """The rows of a JSONL file; None when it does not exist."""
  f = epath.Path(p)
  if not f.exists():
    return None
  return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()
          if line.strip()]


def rmtree(p: PathLike, *, sync: bool = True) -> None:
  """Remove a directory tree if it exists (process 0; between barriers when `sync`)."""
  if sync:
    barrier(f"before-rmtree:{os.fspath(p)}")
  if is_writer():
    d = epath.Path(p)
    if d.exists():
      d.rmtree()
  if sync:
    barrier(f"rmtree:{os.fspath(p)}")


class AppendWriter:
  """A text file that grows line by line (metrics logs), written by process 0 only.

  Local files are appended to and flushed per line. Object stores cannot append: the file is
  rewritten whole (one atomic upload) at most every `flush_s` seconds and at `close`.
  """

  def __init__(self, p: PathLike, initial_lines: Iterable[str] = (), *, flush_s: float = 30.0):
    self.path = epath.Path(p)
    self.enabled = is_writer()
    self._lines = [l if l.endswith("\n") else l + "\n" for l in initial_lines]
    self._flush_s, self._last = flush_s, 0.0
    self._local = is_local(p)
    self._f = None
    if not self.enabled:
      return
    _write_one(self.path, "".join(self._lines).encode("utf-8"))
    if self._local:
      self._f = open(os.fspath(self.path), "a", encoding="utf-8")
      self._lines = []

  def write_line(self, line: str) -> None:
    if not self.enabled:
      return
    if self._f is not None:
      self._f.write(line + "\n")
      self._f.flush()
      return
    self._lines.append(line + "\n")
    now = time.monotonic()
    if now - self._last >= self._flush_s:
      self.flush()
      self._last = now

  def flush(self) -> None:
    if self.enabled and self._f is None:
      _write_one(self.path, "".join(self._lines).encode("utf-8"))

  def close(self) -> None:
    if not self.enabled:
      return
    if self._f is not None:
      self._f.close()
    else:
      self.flush()


def save_figure(fig, p: PathLike, *, dpi: int = 120) -> None:
  """A matplotlib figure as a PNG at `p` (process 0 writes; no barrier: nothing reads it)."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  write_bytes(p, buf.getvalue(), sync=False)
