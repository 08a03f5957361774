"""Checkpoints for every training loop: a thin layer over orbax `CheckpointManager`.

Usage (the whole API)::

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1000, keep=3)
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(abstract_state)      # shapes + target shardings
    data_iter.set_state(extra["data"])
  for step in range(start, num_steps + 1):
    state, metrics = train_step(state, batch, rng)
    ckpt.maybe_save(step, state, extra={"data": data_iter.get_state()})
  ckpt.maybe_save(num_steps, state, extra=..., force=True)
  ckpt.close()                                        # waits for async writes

On-disk layout (one directory per step, written by orbax to
`<step>.orbax-checkpoint-tmp` and renamed when complete, so a killed process
leaves no directory that `latest_step` would list)::

  <directory>/<step>/_CHECKPOINT_METADATA   orbax step metadata
  <directory>/<step>/state/                 the pytree (orbax StandardSave, OCDBT+zarr)
  <directory>/<step>/extra/metadata         `extra` as JSON
  <directory>/<step>/checksums/metadata     JSON {leaf path: {shape, dtype, hash}}

Why checksums: orbax/tensorstore catch deleted or truncated files and broken
metadata, but a flipped byte inside a large array's data file is returned
silently (observed with orbax-checkpoint 0.12.8, tensorstore 0.1.86). Each leaf's
32-bit hash is computed on device (one fused jitted reduction, no host copy)
when saving and checked after restoring, so corruption raises instead of
training on garbage.

Dtype policy: a leaf may be restored into a different dtype of the same family
(float32 <-> bfloat16, int32 <-> int64; orbax casts while reading), which is
what loading float32 training weights for bfloat16 serving needs. A change of
family (int <-> float, bool, ...) is a config mismatch and raises. Cast leaves
cannot be compared with their saved hash, so they are not checksum-verified.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_STATE = "state"
_EXTRA = "extra"
_CHECKSUMS = "checksums"
_CHECKSUM_FORMAT = 1
# Listing every bad leaf of a 1000-leaf model would bury the first one.
_MAX_LISTED = 10


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match what is restored."""


class Checkpointer:
  """Saves and restores `(state, extra)` under one directory, one step per subdir.

  `state` is a pytree of jax arrays (also numpy arrays and python scalars);
  `extra` is a JSON-serialisable dict (data-iterator state, config, metrics).
  """

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where step subdirectories live; local path or any path orbax
        (etils.epath) understands, e.g. gs://.
      save_every: `maybe_save` writes when `step % save_every == 0`.
      keep: how many of the newest checkpoints to keep; older ones are deleted.
      async_save: write in a background thread so the training loop only
        waits for the device-to-host copy.
    """
    if save_every < 1:
      raise CheckpointError(f"save_every must be >= 1, got {save_every}.")
    if keep < 1:
      raise CheckpointError(f"keep must be >= 1, got {keep}.")
    self.directory = os.fspath(directory)
    self.save_every = save_every
    self.keep = keep
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # We decide when to save (see maybe_save); orbax's own interval and
        # "saving in progress" policies would silently skip requested saves.
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _EXTRA: ocp.JsonCheckpointHandler(),
            _CHECKSUMS: ocp.JsonCheckpointHandler(),
        },
    )

  # -- saving -----------------------------------------------------------------

  def maybe_save(self, step: int, state: Any, extra: dict | None = None, *,
                 force: bool = False) -> bool:
    """Saves `state` and `extra` at `step` if it is a save step (or `force`).

    With async saving this returns once the arrays are copied off the device;
    the files are written in the background (call `wait` to make them durable).
    A step that is already saved is skipped, so a final forced save at a
    periodic save step is harmless.

    Args:
      step: the training step the state belongs to.
      state: pytree of jax arrays / numpy arrays / python scalars.
      extra: JSON-serialisable dict; numpy and jax scalars/arrays are converted.
      force: save even if `step % save_every != 0`.

    Returns:
      True if a save was started.

    Raises:
      CheckpointError: `step` is older than the newest checkpoint (continuing
        would make `latest_step` point at the stale newer one), or `extra` is
        not JSON-serialisable.
    """
    step = int(step)
    if not force and step % self.save_every:
      return False
    latest = self._mgr.latest_step()
    if latest is not None and step == latest:
      return False
    if latest is not None and step < latest:
      raise CheckpointError(
          f"Cannot save step {step} in {self.directory}: it already has a newer "
          f"checkpoint at step {latest}, which would stay the one resumed from. "
          f"If you restarted from an earlier step on purpose, delete "
          f"{self._step_dir(latest)} (and any other step dirs > {step}), or use "
          f"a fresh workdir.")
    extra_json = _to_json(extra or {})
    checksums = {"format": _CHECKSUM_FORMAT, "leaves": _leaf_checksums(state)}
    saved = self._mgr.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _EXTRA: ocp.args.JsonSave(extra_json),
            _CHECKSUMS: ocp.args.JsonSave(checksums),
        }),
        force=True,
    )
    return bool(saved)

  def wait(self) -> None:
    """Blocks until all started saves are written and finalised."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax resources."""
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- listing ----------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Completed checkpoint steps, ascending (unfinished temp dirs excluded)."""
    self._refresh()
    return sorted(int(s) for s in self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """Newest completed checkpoint step, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _refresh(self) -> None:
    # Another process (the trainer, for an evaluator) may have added steps
    # since we listed. Re-listing during our own async save would drop the
    # in-flight step from orbax's bookkeeping, so only refresh when idle.
    if not self._mgr.is_saving_in_progress():
      self._mgr.reload()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- restoring --------------------------------------------------------------

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict]:
    """Restores `(state, extra)` into the shapes, dtypes and shardings given.

    Args:
      abstract_state: pytree like the saved state, of `jax.ShapeDtypeStruct`
        (its `.sharding` is where each leaf is placed; none means the default
        device) or of arrays (their shardings are used). Numpy arrays and
        python scalars restore as such.
      step: which step; None means the latest.

    Returns:
      `(state, extra)`: state with the structure of `abstract_state`, and the
      `extra` dict saved with it.

    Raises:
      CheckpointError: no checkpoint, unknown step, a structure/shape/dtype
        mismatch with `abstract_state`, or a corrupt checkpoint.
    """
    # Our own in-flight save is listed already but its directory is still a
    # temp dir; finish it so restoring what we just saved works.
    self._mgr.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(
          f"No checkpoint to restore: {self.directory} has no completed "
          f"checkpoints. Check the --workdir, or start training from scratch.")
    if step is None:
      step = steps[-1]
    step = int(step)
    if step not in steps:
      raise CheckpointError(
          f"No checkpoint for step {step} in {self.directory}; available steps: "
          f"{steps}.")
    step_dir = self._step_dir(step)

    try:
      stored = self._mgr.item_metadata(step)[_STATE]
      if stored is None:
        raise ValueError(f"no '{_STATE}' item metadata")
      stored = _metadata_by_path(getattr(stored, "tree", stored))
    except Exception as e:  # orbax/tensorstore raise many types for bad files.
      raise _corrupt(step_dir, step, steps, e) from e

    target = jax.tree.map(_as_restore_target, abstract_state)
    _check_compatible(stored, target, step_dir)

    # Checkpoints written by other tools may lack the extra/checksums items;
    # those restore with extra={} and unverified rather than being refused.
    present = {name for name in (_EXTRA, _CHECKSUMS)
               if (epath.Path(step_dir) / name).exists()}
    items = {_STATE: ocp.args.StandardRestore(target)}
    items.update({name: ocp.args.JsonRestore() for name in present})
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
      state = restored[_STATE]
      extra = restored[_EXTRA] if _EXTRA in present else None
      saved_checksums = restored[_CHECKSUMS] if _CHECKSUMS in present else None
    except Exception as e:
      raise _corrupt(step_dir, step, steps, e) from e
    if saved_checksums is not None:
      bad = _checksum_mismatches(saved_checksums, state)
      if bad:
        raise _corrupt(step_dir, step, steps, ValueError(
            "array data does not match the checksum written at save time for: "
            + ", ".join(bad[:_MAX_LISTED])))
    return state, (extra if extra is not None else {})


# -- structure checks -----------------------------------------------------------


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: tuple) -> str:
  """`params/layer_0/attn/q/kernel`; namedtuple fields by name, as orbax stores."""
  return "/".join(_key_str(k) for k in path)


def _is_metadata_leaf(x: Any) -> bool:
  return (hasattr(x, "shape") and hasattr(x, "dtype")
          and not isinstance(x, (dict, list, tuple)))


def _metadata_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_metadata_leaf)[0]
  out = {}
  for path, leaf in leaves:
    if not _is_metadata_leaf(leaf):
      raise ValueError(f"unexpected metadata entry at {_path_str(path)}: {leaf!r}")
    out[_path_str(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  if isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)):
    return tuple(x.shape), np.dtype(x.dtype)
  return (), np.asarray(x).dtype


def _as_restore_target(x: Any) -> Any:
  """Leaves orbax restores into: arrays become specs with an explicit sharding."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
    # Without a sharding orbax falls back to the one saved in the checkpoint,
    # which names devices of the saving job; the default device is always valid.
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype,
        sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  return x


def _family(dtype: np.dtype) -> str:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return "key"
  if jnp.issubdtype(dtype, jnp.bool_):
    return "bool"
  if jnp.issubdtype(dtype, jnp.integer):
    return "int"
  if jnp.issubdtype(dtype, jnp.floating):
    return "float"
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return "complex"
  return str(dtype)


def _check_compatible(stored: dict, target: Any, step_dir: str) -> None:
  """Raises CheckpointError listing every leaf where checkpoint and target differ."""
  wanted = {_path_str(p): _shape_dtype(x)
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  problems = []
  for path in sorted(wanted.keys() - stored.keys()):
    shape, dtype = wanted[path]
    problems.append(f"{path}: expected by the config ({shape} {dtype}) but missing "
                    f"from the checkpoint")
  for path in sorted(stored.keys() - wanted.keys()):
    shape, dtype = stored[path]
    problems.append(f"{path}: in the checkpoint ({shape} {dtype}) but not in the "
                    f"state being restored")
  for path in sorted(stored.keys() & wanted.keys()):
    (s_shape, s_dtype), (w_shape, w_dtype) = stored[path], wanted[path]
    if s_shape != w_shape:
      problems.append(f"{path}: checkpoint has shape {s_shape}, config expects "
                      f"shape {w_shape}")
    elif _family(s_dtype) != _family(w_dtype):
      problems.append(f"{path}: checkpoint has dtype {s_dtype}, config expects "
                      f"dtype {w_dtype} (only casts within float or within int "
                      f"are allowed)")
  if problems:
    more = len(problems) - _MAX_LISTED
    listing = "\n  ".join(problems[:_MAX_LISTED])
    if more > 0:
      listing += f"\n  ... and {more} more"
    raise CheckpointError(
        f"Checkpoint {step_dir} does not match the state being restored:\n"
        f"  {listing}\n"
        f"It was written with a different model/optimizer config. Pick the config "
        f"that matches this checkpoint, or train from scratch with a fresh "
        f"--workdir.")


def _corrupt(step_dir: str, step: int, steps: list[int], err: Exception
             ) -> CheckpointError:
  earlier = [s for s in steps if s < step]
  hint = (f"restore an earlier step (restore(..., step={earlier[-1]}); available: "
          f"{earlier}) or " if earlier else "")
  # Tensorstore appends its whole JSON spec; the part before it says what broke.
  detail = str(err).split(" [tensorstore_spec=")[0].strip()
  detail = detail.splitlines()[0][:300] if detail else type(err).__name__
  return CheckpointError(
      f"Checkpoint {step_dir} is corrupt or incomplete ({type(err).__name__}: "
      f"{detail}). To recover, {hint}delete {step_dir} so that training resumes "
      f"from the previous checkpoint.")


# -- extra ----------------------------------------------------------------------


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _to_json(extra: dict) -> dict:
  if not isinstance(extra, dict):
    raise CheckpointError(f"extra must be a dict, got {type(extra).__name__}.")
  try:
    # Round trip now: a bad value should fail in the caller, not in orbax's
    # background thread after the training loop moved on.
    return json.loads(json.dumps(extra, default=_json_default))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"extra must be JSON-serialisable: {e}") from e


# -- checksums ------------------------------------------------------------------
# A hash per leaf: sum over elements of mix(bits ^ mix(flat_index)) mod 2**32.
# mix is a bijection, so changing any single element always changes the sum;
# integer sums are exact in any order, so sharding does not matter. The same
# formula runs in numpy (host leaves) and jax (device leaves, one jitted call).

_U32 = np.uint32


def _hashable(dtype: np.dtype) -> bool:
  dtype = np.dtype(dtype)
  if _family(dtype) not in ("bool", "int", "float"):
    return False
  # Sub-byte types (int4, float4) have no bit-exact bitcast to a word.
  return jax.dtypes.itemsize_bits(dtype) == 8 * dtype.itemsize and (
      dtype.itemsize in (1, 2, 4, 8))


def _mix(x):
  x = x ^ (x >> _U32(16))
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> _U32(15))
  x = x * _U32(0x846CA68B)
  return x ^ (x >> _U32(16))


def _combine(words, index):
  return _mix(words ^ _mix(index + _U32(0x9E3779B9)))


def _np_hash(x: Any) -> int:
  x = np.asarray(x).reshape(-1)
  if x.dtype.kind == "b":
    words = x.astype(_U32)
  elif x.dtype.itemsize == 8:
    v = x.view(np.uint64)
    words = (v & np.uint64(0xFFFFFFFF)).astype(_U32) ^ _mix(
        (v >> np.uint64(32)).astype(_U32))
  else:
    words = x.view(np.dtype(f"uint{8 * x.dtype.itemsize}")).astype(_U32)
  index = np.arange(x.size, dtype=np.uint64).astype(_U32)
  return int(np.sum(_combine(words, index), dtype=_U32))


def _jnp_hash(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:
    v = jax.lax.bitcast_convert_type(x, jnp.uint64)
    words = (v & np.uint64(0xFFFFFFFF)).astype(jnp.uint32) ^ _mix(
        (v >> np.uint64(32)).astype(jnp.uint32))
  else:
    words = jax.lax.bitcast_convert_type(
        x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  # Row-major flat index built per dimension: a reshape(-1) of a sharded array
  # could make XLA gather it onto one device.
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * _U32(
        stride % 2**32)
    stride *= x.shape[d]
  return jnp.sum(_combine(words, index), dtype=jnp.uint32)


_device_hashes: Callable = jax.jit(lambda xs: [_jnp_hash(x) for x in xs])


def _checksum_mismatches(saved: Any, state: Any) -> list[str]:
  """Paths of leaves restored in their saved dtype whose hash changed."""
  if not isinstance(saved, dict) or saved.get("format") != _CHECKSUM_FORMAT:
    return [f"<unreadable {_CHECKSUMS}/metadata: {str(saved)[:200]}>"]
  saved = saved.get("leaves", {})
  return [p for p, c in _leaf_checksums(state).items()
          if p in saved and c["hash"] is not None
          and saved[p].get("dtype") == c["dtype"]
          and saved[p].get("hash") != c["hash"]]


def _leaf_checksums(state: Any) -> dict[str, dict]:
  """{path: {shape, dtype, hash}}; hash None where the dtype is not hashable."""
  out = {}
  # One jitted call per device set: jit refuses arguments committed to
  # different devices (e.g. mesh-sharded params next to a step counter on
  # device 0).
  groups: dict[tuple, tuple[list[str], list[jax.Array]]] = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    p = _path_str(path)
    shape, dtype = _shape_dtype(x)
    out[p] = {"shape": list(shape), "dtype": str(dtype), "hash": None}
    if not _hashable(dtype):
      continue
    if isinstance(x, jax.Array):
      key = tuple(sorted(d.id for d in x.sharding.device_set))
      paths, leaves = groups.setdefault(key, ([], []))
      paths.append(p)
      leaves.append(x)
    else:
      out[p]["hash"] = _np_hash(x)
  for paths, leaves in groups.values():
    # The hashes are replicated scalars: read from this process's own copy.
    for p, h in zip(paths, [np.asarray(x.addressable_data(0))
                            for x in _device_hashes(leaves)]):
      out[p]["hash"] = int(h)
  return out
