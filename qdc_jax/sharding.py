"""Meshes, logical-axis rules and sharded initialisation.

Models name logical axes only ("embed", "heads", "act_batch", ...). A config holds a short rule
list mapping each logical name to mesh axes of the (data, fsdp, tensor) mesh; everything here
turns those into `NamedSharding`s for `jax.jit`'s explicit in/out shardings.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: FSDP over the model dimension, tensor parallelism over
# heads / MLP / vocabulary (Megatron style). Activations: batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("act_len", None),
    ("cache_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


def rules_from_config(rules: Optional[Sequence[Sequence[Any]]]) -> tuple:
  """Normalise a config's rule list (lists from ml_collections) into tuples."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"Each sharding rule is (logical_name, mesh_axes); got {item!r}")
    name, axes = item
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"Sharding rule {name!r} names mesh axis {a!r}; valid: {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[Any]] = None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
  """Mesh of `shape` over `devices` (all by default); one entry of -1 takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"Mesh shape {shape} must have one entry per axis {tuple(axis_names)}")
  if shape.count(-1) > 1:
    raise ValueError(f"Mesh shape {shape}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  # Several processes: say where the devices come from (the usual surprise is that the mesh
  # spans every host's chips, not one host's).
  n = len(devices)
  have = (f"{n} devices ({jax.process_count()} processes x {jax.local_device_count()} local "
          f"devices)" if jax.process_count() > 1 and devices == list(jax.devices())
          else f"{n} devices")
  if -1 in shape:
    if n % known:
      raise ValueError(f"Mesh shape {tuple(shape)} does not divide the {have}: the sizes "
                       f"other than -1 multiply to {known}; pick sizes whose product "
                       f"divides {n} (config.mesh.shape)")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(f"Mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have "
                     f"{have}; use -1 on one axis to fill (config.mesh.shape)")
  try:
    # Topology-aware device order on TPU/GPU slices.
    arr = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.info("mesh_utils could not lay out %s (%s); using device order", shape, e)
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, tuple(axis_names))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
  """Context in which `nn.with_logical_constraint` in the model resolves against `mesh`."""
  # jax.set_mesh replaces the deprecated `with mesh:`; keep the old form for older JAX.
  mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
  with mesh_ctx, nn.logical_axis_rules(rules):
    yield


def jit_sharded(fn: Callable, mesh: Mesh, rules, *, in_shardings, out_shardings,
                donate_argnums=()) -> Callable:
  """`jax.jit(fn)` with explicit in/out shardings, called under `activation_rules(mesh,
  rules)` so the model's logical constraints resolve against the mesh: the one wrapper
  every jitted step (train, eval, sampler, embeddings) goes through."""
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)

  def run(*args):
    with activation_rules(mesh, rules):
      return jitted(*args)
  return run


def shardings_key(tree) -> tuple:
  """A hashable key for a pytree of shardings, compared by value (compiled-function caches)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(leaves)


def logical_to_shardings(logical_specs, mesh: Mesh, rules):
  """Tree of logical PartitionSpecs -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def axes_to_sharding(axes: Sequence[Optional[str]], mesh: Mesh, rules) -> NamedSharding:
  """One tuple of logical axis names (e.g. ("act_batch", None)) -> NamedSharding."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] host batch: batch over the data-parallel axes."""
  return axes_to_sharding(("act_batch",) + (None,) * (ndim - 1), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
  """Initialise a pytree straight into its shardings, never materialising it on one device.

  `init_fn(*args)` returns a pytree whose leaves may be `nn.Partitioned` boxes (the logical
  names). Shapes come from `jax.eval_shape`, shardings from the rules; the jitted init then
  writes every shard where it lives. Returns (unboxed tree, tree of NamedShardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  specs = nn.get_partition_spec(abstract)
  shardings = logical_to_shardings(specs, mesh, rules)
  with activation_rules(mesh, rules):
    tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def abstract_with_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
  """ShapeDtypeStructs (with shardings) of `init_fn(*args)`: targets for checkpoint restore."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_to_shardings(nn.get_partition_spec(abstract), mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Per-process host batch -> global jax.Arrays sharded over the data axes.

  Each process holds its own slice of the global batch (the data pipeline shards records by
  process); `make_array_from_process_local_data` stitches them, also on one host.
  """
  out = {}
  for k, v in batch.items():
    sharding = batch_sharding(mesh, rules, np.ndim(v))
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return out


def put_global(batch, mesh: Mesh, rules):
  """Host data that every process holds whole (the same on each) -> global jax.Arrays.

  Each process transfers only the rows its own devices hold (`make_array_from_callback`),
  so the result is the same global array whatever the process count or device order. A dict
  or a single array; the leading axis is sharded over the data axes.
  """
  def one(v):
    v = np.asarray(v)
    sharding = batch_sharding(mesh, rules, v.ndim)
    return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])
  if isinstance(batch, dict):
    return {k: one(v) for k, v in batch.items()}
  return one(batch)


def to_host(tree):
  """Global jax.Arrays -> numpy on every process (never `device_get` of a global array).

  Arrays that span processes are gathered with `process_allgather`; arrays whose shards are
  all addressable here (one process, or replicated) are copied directly.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def initialize_distributed(*, enabled: bool = False, coordinator_address: str = "",
                           num_processes: int = 0, process_id: int = -1,
                           heartbeat_timeout_s: int = 0) -> None:
  """`jax.distributed.initialize()` once, at the entry point (qdc_jax.main's flags).

  With a coordinator address the cluster is given explicitly (GPU hosts, localhost tests);
  `enabled` alone lets JAX auto-detect it (TPU VM slices, SLURM). A no-op otherwise. Must run
  before anything touches a backend (even `jax.process_count()`).
  """
  if not (enabled or coordinator_address):
    return
  kwargs = {}
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes "
                       f">= 1 and 0 <= --process_id < --num_processes (got {num_processes}, "
                       f"{process_id})")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if heartbeat_timeout_s:
    # A dead peer then ends the survivors within about this long instead of a hang.
    kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # older JAX names; irrelevant off CPU
    pass
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
