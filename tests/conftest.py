"""Test setup: CPU only, 8 fake devices so sharding tests can build real meshes.

Compiled programs go to a persistent JAX compilation cache shared by every test process and
subprocess (the xdist workers, the CLI runs, the killed-and-resumed jobs): most of the suite's
time is XLA compiling the same lab programs again. The cache is keyed by the program, the
flags and the jax version, so a hit is the same executable; with a size limit set, JAX locks
the cache directory between processes.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"qdc_jax_test_compilation_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
