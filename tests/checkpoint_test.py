"""Tests for qdc_jax.checkpoint on CPU with 8 fake devices."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qdc_jax import checkpoint as ckpt_lib
from qdc_jax.checkpoint import CheckpointError, Checkpointer


def _train_state(seed: int = 0):
  """{'step', 'params', 'opt_state'} with a real adamw state after one update."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "layer_0": {"attn": {"q": {"kernel": jax.random.normal(k1, (4, 8))}},
                  "bias": jnp.arange(8, dtype=jnp.bfloat16)},
      "embed": jax.random.normal(k2, (16, 4)),
  }
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {"step": jnp.asarray(seed + 1, jnp.int32), "params": params,
          "opt_state": opt_state}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8),
                                  y.reshape(-1).view(np.uint8))


def test_round_trip_keep_and_save_every(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every=2, keep=2)
  states = {}
  for step in range(1, 8):
    states[step] = _train_state(step)
    saved = ckpt.maybe_save(step, states[step], extra={"step": step})
    assert saved == (step % 2 == 0)
  assert ckpt.maybe_save(7, states[7], force=True)
  assert not ckpt.maybe_save(7, states[7], force=True)  # already saved
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]
  assert ckpt.latest_step() == 7

  for step in (6, 7):
    state, extra = ckpt.restore(_abstract(states[step]), step=step)
    _assert_bit_identical(state, states[step])
    # optax namedtuples come back as namedtuples, usable by the optimizer.
    assert type(state["opt_state"][0]) is type(states[step]["opt_state"][0])
  _, extra = ckpt.restore(_abstract(states[7]))
  assert extra == {}  # the forced save had no extra
  with pytest.raises(CheckpointError, match="older|newer"):
    ckpt.maybe_save(4, states[4])
  with pytest.raises(CheckpointError, match=r"step 5.*available steps: \[6, 7\]"):
    ckpt.restore(_abstract(states[6]), step=5)
  ckpt.close()


def test_restore_into_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ("x",))
  w = jnp.arange(32, dtype=jnp.float32).reshape(8, 4)
  v = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  state = {"w": w, "v": v, "step": jnp.asarray(5, jnp.int32), "count": 7}
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.maybe_save(1, state)
  rows = NamedSharding(mesh, P("x", None))
  cols = NamedSharding(mesh, P(None, "x"))
  target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rows),
            "v": jax.device_put(jnp.zeros((2, 8), jnp.int32), cols),
            "step": jax.ShapeDtypeStruct((), jnp.int32), "count": 0}
  restored, _ = Checkpointer(str(tmp_path), save_every=1).restore(target)
  assert restored["w"].sharding == rows
  assert restored["v"].sharding == cols
  assert len(restored["w"].addressable_shards) == 8
  assert restored["w"].addressable_shards[3].data.shape == (1, 4)
  np.testing.assert_array_equal(restored["w"], w)
  np.testing.assert_array_equal(restored["v"], v)
  assert int(restored["step"]) == 5 and restored["count"] == 7


def test_shape_mismatch_names_leaf_and_shapes(tmp_path):
  state = {"params": {"layer_0": {"attn": {"q": {"kernel": jnp.ones((4, 8))}}}}}
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.maybe_save(1, state)
    target = {"params": {"layer_0": {"attn": {"q": {
        "kernel": jax.ShapeDtypeStruct((4, 16), jnp.float32)}}}}}
    with pytest.raises(CheckpointError) as e:
      ckpt.restore(target)
    msg = str(e.value)
    assert "params/layer_0/attn/q/kernel" in msg
    assert "(4, 8)" in msg and "(4, 16)" in msg
    assert "config" in msg and "workdir" in msg


def test_missing_extra_leaf_and_dtype_family(tmp_path):
  state = {"params": {"a": jnp.ones((2,)), "b": jnp.ones((3,))},
           "step": jnp.asarray(1, jnp.int32)}
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.maybe_save(1, state)
    target = _abstract(state)
    target["params"]["c"] = jax.ShapeDtypeStruct((5,), jnp.float32)
    with pytest.raises(CheckpointError, match=r"params/c.*missing"):
      ckpt.restore(target)
    target = _abstract(state)
    del target["params"]["b"]
    with pytest.raises(CheckpointError, match=r"params/b.*not in the state"):
      ckpt.restore(target)
    target = _abstract(state)
    target["step"] = jax.ShapeDtypeStruct((), jnp.float32)
    with pytest.raises(CheckpointError, match=r"step.*int32.*float32"):
      ckpt.restore(target)
    # Same family casts are allowed: float32 weights into bfloat16.
    target = _abstract(state)
    target["params"]["a"] = jax.ShapeDtypeStruct((2,), jnp.bfloat16)
    restored, _ = ckpt.restore(target)
    assert restored["params"]["a"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["params"]["a"], np.ones(2))


def _state_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"),
                                recursive=True)
           if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
  assert files
  return files


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip", "metadata"])
def test_corrupt_checkpoint_raises(tmp_path, damage):
  state = {"big": jax.random.normal(jax.random.key(0), (128, 128)),
           "small": jnp.arange(6.0), "step": jnp.asarray(3, jnp.int32)}
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.maybe_save(1, state)
    ckpt.maybe_save(2, state)
  step_dir = os.path.join(str(tmp_path), "2")
  if damage == "delete":
    for f in _state_files(step_dir):
      os.remove(f)
  elif damage == "truncate":
    for f in _state_files(step_dir):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif damage == "flip":
    # Orbax alone returns such data silently; the checksums must catch it.
    big = max(_state_files(step_dir), key=os.path.getsize)
    with open(big, "r+b") as fh:
      fh.seek(os.path.getsize(big) // 2)
      b = fh.read(1)
      fh.seek(-1, os.SEEK_CUR)
      fh.write(bytes([b[0] ^ 0x10]))
  else:
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as fh:
      fh.write("{not json")
  ckpt = Checkpointer(str(tmp_path), save_every=1)
  assert ckpt.latest_step() == 2
  with pytest.raises(CheckpointError) as e:
    ckpt.restore(_abstract(state))
  msg = str(e.value)
  assert step_dir in msg and "step=1" in msg and "delete" in msg
  restored, _ = ckpt.restore(_abstract(state), step=1)
  _assert_bit_identical(restored, state)


def test_async_save_visible_to_second_checkpointer(tmp_path):
  state = _train_state()
  writer = Checkpointer(str(tmp_path), save_every=10, async_save=True)
  assert writer.maybe_save(10, state, extra={"data": {"epoch": 1}})
  writer.wait()
  reader = Checkpointer(str(tmp_path), save_every=10)
  assert reader.latest_step() == 10
  assert writer.maybe_save(20, state)
  writer.close()
  assert reader.latest_step() == 20  # reader re-lists the directory
  restored, extra = reader.restore(_abstract(state))
  _assert_bit_identical(restored, state)
  assert extra == {}
  _, extra = reader.restore(_abstract(state), step=10)
  assert extra == {"data": {"epoch": 1}}


def test_unfinished_tmp_dir_is_ignored(tmp_path):
  state = {"w": jnp.ones((3,))}
  with Checkpointer(str(tmp_path), save_every=1) as ckpt:
    ckpt.maybe_save(1, state)
  # What a process killed mid-save leaves behind.
  tmp = tmp_path / "2.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "_METADATA").write_text("{")
  ckpt = Checkpointer(str(tmp_path), save_every=1)
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  assert ckpt.maybe_save(2, {"w": jnp.full((3,), 2.0)})
  ckpt.wait()
  restored, _ = ckpt.restore(_abstract(state))
  np.testing.assert_array_equal(restored["w"], np.full(3, 2.0))


def test_extra_round_trip_and_empty_dir(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ck"), save_every=1)
  state = {"step": 3, "w": jnp.ones((2, 2))}
  with pytest.raises(CheckpointError, match="no completed checkpoints"):
    ckpt.restore(state)
  extra = {"name": "sparq run", "data": {"epoch": 2, "offsets": [1, 2, 3],
                                         "nested": {"k": -4}},
           "loss": np.float32(0.5)}
  ckpt.maybe_save(3, state, extra=extra)
  with pytest.raises(CheckpointError, match="JSON"):
    ckpt.maybe_save(4, state, extra={"bad": object()})
  ckpt.close()
  restored, got = Checkpointer(str(tmp_path / "ck"), save_every=1).restore(
      {"step": 0, "w": jnp.zeros((2, 2))})
  assert got == {"name": "sparq run", "data": {"epoch": 2, "offsets": [1, 2, 3],
                                               "nested": {"k": -4}},
                 "loss": 0.5}
  assert restored["step"] == 3
  np.testing.assert_array_equal(restored["w"], np.ones((2, 2)))


def test_hash_is_sharding_independent_and_matches_numpy():
  mesh = jax.make_mesh((8,), ("x",))
  x = jax.random.normal(jax.random.key(1), (8, 6))
  sharded = jax.device_put(x, NamedSharding(mesh, P("x", None)))
  h_dev = int(ckpt_lib._device_hashes([sharded])[0])
  assert h_dev == int(ckpt_lib._device_hashes([x])[0])
  assert h_dev == ckpt_lib._np_hash(np.asarray(x))
  y = np.asarray(x).copy()
  y[5, 2] = np.nextafter(y[5, 2], np.inf)
  assert ckpt_lib._np_hash(y) != h_dev
  b = jnp.arange(5, dtype=jnp.bfloat16)
  assert int(ckpt_lib._device_hashes([b])[0]) == ckpt_lib._np_hash(np.asarray(b))


_KILL_SCRIPT = """
import os, sys
import jax.numpy as jnp
from qdc_jax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], save_every=1)
ckpt.maybe_save(1, {"w": jnp.ones((2048, 2048))})
ckpt.wait()
ckpt.maybe_save(2, {"w": jnp.full((2048, 2048), 2.0)})
os._exit(9)  # killed while step 2 is being written in the background
"""


def test_process_killed_mid_save_leaves_no_half_checkpoint(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)],
                        env=env, capture_output=True, timeout=120)
  assert proc.returncode == 9, proc.stderr.decode()[-2000:]
  ckpt = Checkpointer(str(tmp_path), save_every=1)
  latest = ckpt.latest_step()
  # Usually the kill lands mid-write (step 1 is latest); if the write won the
  # race, step 2 must be complete. Either way latest must restore cleanly.
  assert latest in (1, 2)
  target = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
  restored, _ = ckpt.restore(target)
  np.testing.assert_array_equal(restored["w"],
                                np.full((2048, 2048), latest, np.float32))
  assert ckpt.maybe_save(3, {"w": jnp.zeros((2048, 2048))})
  ckpt.close()
