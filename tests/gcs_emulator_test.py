"""The GCS emulator (tests/gcs_emulator.py) really carries the project's gs:// I/O.

Every check looks at the emulator's own store (or its request log), never at a local disk:
the storage layer (epath -> gcsfs), orbax's metadata (epath) and array data (tensorstore's gcs
kvstore) and orbax's bucket lookup (google-cloud-storage) all reach it over HTTP, and nothing
named `gs:` appears locally. A child process gets there from the environment alone.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from gcs_emulator import DEFAULT_BUCKET, emulator_env
from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  pylint: disable=unused-import
from qdc_jax import storage
from qdc_jax.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
  """Run in an empty cwd: a gs:// path mistaken for a local one would land here as `gs:`."""
  monkeypatch.chdir(tmp_path)
  yield
  assert not os.path.exists(tmp_path / "gs:"), os.listdir(tmp_path)
  assert not os.path.exists(os.path.join(REPO, "gs:"))


def _http(em, method, path, body=None, headers=None):
  req = urllib.request.Request(em.url + path, data=body, method=method, headers=headers or {})
  try:
    with urllib.request.urlopen(req, timeout=10) as r:
      return r.status, dict(r.headers), r.read()
  except urllib.error.HTTPError as e:
    return e.code, dict(e.headers), e.read()


def _o(name):
  return urllib.parse.quote(name, safe="")


# -- the storage layer ---------------------------------------------------------------------


def test_epath_uses_gcsfs_pointed_at_the_emulator(gcs_bucket, gcs_server):
  p = epath.Path(f"{gcs_bucket}/x")
  backend = p._backend  # pylint: disable=protected-access
  assert type(backend).__name__ == "_FileSystemSpecBackend"  # not tf.io.gfile, not os
  fs = backend.fs(p)
  assert type(fs).__module__ == "gcsfs.core"
  assert fs._location == gcs_server.url  # pylint: disable=protected-access
  assert not storage.is_local(gcs_bucket)


def test_storage_write_read_list_delete_land_in_the_emulator(gcs_bucket, gcs_server):
  before = sum(n for (_, agent), n in gcs_server.requests.items() if agent == "gcsfs")
  uploads = sum(gcs_server.uploads.values())
  d = storage.join(gcs_bucket, "run", "sub")
  storage.write_text(storage.join(d, "a.txt"), "héllo")
  storage.write_json(storage.join(d, "b.json"), {"x": [1, 2]})
  storage.write_rows(storage.join(d, "rows.jsonl"), [{"i": 0}, {"i": 1}])
  storage.write_bytes(storage.join(gcs_bucket, "run", "top.bin"), b"\x00\x01")
  assert sum(gcs_server.uploads.values()) == uploads + 4  # one upload per file

  # The objects are in the emulator's store, under the exact names.
  assert gcs_server.object_names(DEFAULT_BUCKET) == [
      "run/sub/a.txt", "run/sub/b.json", "run/sub/rows.jsonl", "run/top.bin"]
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "run/sub/a.txt") == "héllo".encode()
  assert json.loads(gcs_server.get_bytes(DEFAULT_BUCKET, "run/sub/b.json")) == {"x": [1, 2]}

  assert storage.read_text(storage.join(d, "a.txt")) == "héllo"
  assert storage.read_json(storage.join(d, "b.json")) == {"x": [1, 2]}
  assert storage.read_json(storage.join(d, "missing.json"), default=7) == 7
  assert storage.read_rows(storage.join(d, "rows.jsonl")) == [{"i": 0}, {"i": 1}]
  assert storage.listdir(storage.join(gcs_bucket, "run")) == ["sub", "top.bin"]
  assert storage.listdir(storage.join(gcs_bucket, "nothing")) == []
  assert storage.exists(d) and not storage.exists(storage.join(gcs_bucket, "nothing"))

  storage.path(storage.join(d, "a.txt")).unlink()
  assert "run/sub/a.txt" not in gcs_server.object_names(DEFAULT_BUCKET)
  storage.rmtree(storage.join(gcs_bucket, "run"))
  assert gcs_server.object_names(DEFAULT_BUCKET) == []
  assert not storage.exists(storage.join(gcs_bucket, "run", "top.bin"))
  after = sum(n for (_, agent), n in gcs_server.requests.items() if agent == "gcsfs")
  assert after - before >= 10  # every call above went over HTTP


def test_storage_reads_what_the_emulator_holds(gcs_bucket, gcs_server):
  """Reads come from the server: an object put straight into its store is read back."""
  gcs_server.put_bytes(DEFAULT_BUCKET, "seeded/data.json", b'{"seeded": true}')
  assert storage.read_json(f"{gcs_bucket}/seeded/data.json") == {"seeded": True}
  assert storage.listdir(f"{gcs_bucket}/seeded") == ["data.json"]


def test_append_writer_rewrites_whole_objects(gcs_bucket, gcs_server):
  w = storage.AppendWriter(f"{gcs_bucket}/log.txt", ["a"], flush_s=0.0)
  w.write_line("b")
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "log.txt") == b"a\nb\n"  # rewritten whole
  w.write_line("c")
  w.close()
  assert storage.read_text(f"{gcs_bucket}/log.txt") == "a\nb\nc\n"


def test_large_file_goes_through_a_chunked_resumable_upload(gcs_bucket, gcs_server):
  data = np.random.default_rng(0).bytes(6 * 2**20 + 123)  # > gcsfs's 5 MiB block: 2 chunks
  before = gcs_server.uploads["resumable"]
  puts = sum(n for (m, agent), n in gcs_server.requests.items() if agent == "gcsfs")
  storage.write_bytes(f"{gcs_bucket}/big.bin", data)
  assert gcs_server.uploads["resumable"] == before + 1
  # initiate + at least two chunks
  assert sum(n for (m, agent), n in gcs_server.requests.items() if agent == "gcsfs") >= puts + 3
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "big.bin") == data
  assert storage.read_bytes(f"{gcs_bucket}/big.bin") == data


def test_local_paths_stay_local_while_the_emulator_is_on(gcs_bucket, gcs_server, tmp_path):
  storage.write_text(str(tmp_path / "local.txt"), "here")
  assert (tmp_path / "local.txt").read_text() == "here"
  assert gcs_server.object_names(DEFAULT_BUCKET) == []


# -- orbax: metadata through epath, arrays through tensorstore -----------------------------


def test_checkpointer_round_trip_on_gs(gcs_bucket, gcs_server):
  directory = f"{gcs_bucket}/w/checkpoints"
  tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
          "b": {"c": jnp.ones((5,), jnp.bfloat16)}, "step": jnp.asarray(0, jnp.int32)}
  ts_before = sum(n for (_, agent), n in gcs_server.requests.items() if agent == "tensorstore")
  gcloud_before = gcs_server.requests[("GET", "gcloud-python")]
  ckpt = Checkpointer(directory, save_every=1, keep=2)
  for step in (1, 2, 3):
    ckpt.maybe_save(step, jax.tree.map(lambda x, s=step: x + s, tree), extra={"data": step})
  ckpt.close()

  names = gcs_server.object_names(DEFAULT_BUCKET, "w/checkpoints/")
  steps = sorted({n.split("/")[2] for n in names})
  assert steps == ["2", "3"]  # keep=2: step 1 deleted from the bucket by orbax
  assert "w/checkpoints/3/state/manifest.ocdbt" in names  # tensorstore's OCDBT root
  assert any("/state/ocdbt.process_0/d/" in n for n in names)  # the array data files
  assert "w/checkpoints/3/extra/metadata" in names
  ts_after = sum(n for (_, agent), n in gcs_server.requests.items() if agent == "tensorstore")
  assert ts_after - ts_before > 0  # array data went over tensorstore's gcs driver
  # Deleting step 1, orbax asked google-cloud-storage whether the bucket is hierarchical.
  assert gcs_server.requests[("GET", "gcloud-python")] > gcloud_before

  reopened = Checkpointer(directory, save_every=1, keep=2)
  assert reopened.all_steps() == [2, 3]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  state, extra = reopened.restore(abstract)
  reopened.close()
  assert extra == {"data": 3}
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(tree)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want + 3, np.float32))


# -- a child process: the environment alone is enough ----------------------------------------


_CHILD = r"""
import json, os, sys
import tensorstore as ts
from qdc_jax import storage
b = sys.argv[1]
storage.write_text(b + "/child/hello.txt", "from child")
seen = storage.read_json(b + "/parent.json")
kv = ts.KvStore.open({"driver": "gcs", "bucket": b[len("gs://"):], "path": "child/ts/"}).result()
kv.write("k", b"tensorstore").result()
print(json.dumps({"seen": seen, "ls": storage.listdir(b + "/child")}))
"""


def test_child_process_inherits_the_emulator(gcs_bucket, gcs_server):
  gcs_server.put_bytes(DEFAULT_BUCKET, "parent.json", b'{"from": "parent"}')
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  for k, v in emulator_env(gcs_server.url).items():
    assert env[k] == v  # set by the fixture, inherited as is
  res = subprocess.run([sys.executable, "-c", _CHILD, gcs_bucket], env=env, cwd=os.getcwd(),
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out == {"seen": {"from": "parent"}, "ls": ["hello.txt", "ts"]}
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "child/hello.txt") == b"from child"
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "child/ts/k") == b"tensorstore"


# -- the emulator's protocol (what the clients rely on) --------------------------------------


def test_protocol_preconditions_ranges_and_errors(gcs_bucket, gcs_server):
  del gcs_bucket
  up = f"/upload/storage/v1/b/{DEFAULT_BUCKET}/o?uploadType=media&name=p%2Fa"
  code, _, body = _http(gcs_server, "POST", up + "&ifGenerationMatch=0", b"0123456789")
  assert code == 200
  gen = json.loads(body)["generation"]
  assert json.loads(body)["size"] == "10"
  # Create-only write of an existing object fails like GCS.
  assert _http(gcs_server, "POST", up + "&ifGenerationMatch=0", b"x")[0] == 412
  assert _http(gcs_server, "POST", up + f"&ifGenerationMatch={gen}", b"abcdefghij")[0] == 200
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "p/a") == b"abcdefghij"
  media = f"/storage/v1/b/{DEFAULT_BUCKET}/o/{_o('p/a')}?alt=media"
  code, headers, body = _http(gcs_server, "GET", media, headers={"Range": "bytes=2-4"})
  assert (code, body) == (206, b"cde")
  assert headers["Content-Range"] == "bytes 2-4/10"
  assert headers["x-goog-generation"] == str(gcs_server.generation(DEFAULT_BUCKET, "p/a"))
  assert _http(gcs_server, "GET", media, headers={"Range": "bytes=-3"})[2] == b"hij"
  assert _http(gcs_server, "GET", media, headers={"Range": "bytes=10-"})[0] == 416
  now = gcs_server.generation(DEFAULT_BUCKET, "p/a")
  assert _http(gcs_server, "GET", media + f"&ifGenerationNotMatch={now}")[0] == 304
  code, _, body = _http(gcs_server, "GET", f"/storage/v1/b/{DEFAULT_BUCKET}/o/{_o('nope')}")
  assert code == 404 and json.loads(body)["error"]["code"] == 404
  assert _http(gcs_server, "GET", "/storage/v1/b/no-such-bucket/o")[0] == 404
  assert _http(gcs_server, "DELETE", f"/storage/v1/b/{DEFAULT_BUCKET}/o/{_o('p/a')}"
               "?ifGenerationMatch=1")[0] == 412
  assert _http(gcs_server, "DELETE", f"/storage/v1/b/{DEFAULT_BUCKET}/o/{_o('p/a')}")[0] == 204
  assert gcs_server.object_names(DEFAULT_BUCKET) == []


def test_protocol_list_pages_with_delimiter(gcs_bucket, gcs_server):
  del gcs_bucket
  for n in ("a/1", "a/2", "b/x/1", "b/y", "c", "d/"):
    gcs_server.put_bytes(DEFAULT_BUCKET, n, b"")
  seen_items, seen_prefixes, token = [], [], None
  while True:
    q = {"delimiter": "/", "maxResults": "2", **({"pageToken": token} if token else {})}
    code, _, body = _http(gcs_server, "GET", f"/storage/v1/b/{DEFAULT_BUCKET}/o?"
                          + urllib.parse.urlencode(q))
    assert code == 200
    page = json.loads(body)
    assert len(page.get("items", [])) + len(page.get("prefixes", [])) <= 2
    seen_items += [i["name"] for i in page.get("items", [])]
    seen_prefixes += page.get("prefixes", [])
    token = page.get("nextPageToken")
    if not token:
      break
  assert seen_items == ["c"]
  assert seen_prefixes == ["a/", "b/", "d/"]
  code, _, body = _http(gcs_server, "GET", f"/storage/v1/b/{DEFAULT_BUCKET}/o?prefix=b%2F")
  assert [i["name"] for i in json.loads(body)["items"]] == ["b/x/1", "b/y"]


def test_protocol_multipart_resumable_and_rewrite(gcs_bucket, gcs_server):
  del gcs_bucket
  base = f"/upload/storage/v1/b/{DEFAULT_BUCKET}/o"
  body = (b"--B\r\nContent-Type: application/json\r\n\r\n"
          b'{"name": "m/obj", "metadata": {"k": "v"}}\r\n'
          b"--B\r\nContent-Type: text/plain\r\n\r\nmultipart data\r\n--B--\r\n")
  code, _, out = _http(gcs_server, "POST", base + "?uploadType=multipart", body,
                       {"Content-Type": 'multipart/related; boundary="B"'})
  assert code == 200 and json.loads(out)["metadata"] == {"k": "v"}
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "m/obj") == b"multipart data"

  code, headers, _ = _http(gcs_server, "POST", base + "?uploadType=resumable",
                           json.dumps({"name": "r/obj"}).encode(),
                           {"Content-Type": "application/json"})
  assert code == 200
  session = headers["Location"][len(gcs_server.url):]
  code, headers, _ = _http(gcs_server, "PUT", session, b"abc",
                           {"Content-Range": "bytes 0-2/*"})
  assert code == 308 and headers["Range"] == "bytes=0-2"
  code, _, _ = _http(gcs_server, "PUT", session, b"def", {"Content-Range": "bytes 3-5/6"})
  assert code == 200
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "r/obj") == b"abcdef"

  code, _, out = _http(gcs_server, "POST", f"/storage/v1/b/{DEFAULT_BUCKET}/o/{_o('r/obj')}"
                       f"/rewriteTo/b/{DEFAULT_BUCKET}/o/{_o('r/copy')}", b"")
  assert code == 200 and json.loads(out)["done"]
  assert gcs_server.get_bytes(DEFAULT_BUCKET, "r/copy") == b"abcdef"
  md5 = json.loads(out)["resource"]["md5Hash"]
  assert base64.b64decode(md5) == hashlib.md5(b"abcdef").digest()


# -- a whole experiment on a gs:// workdir ---------------------------------------------------


def test_lab_trainer_runs_and_resumes_after_a_kill_on_a_gs_workdir(gcs_bucket, gcs_server):
  """`python -m qdc_jax.main` on gs://: SIGKILLed once its first checkpoint is committed in
  the bucket, re-run on the same workdir, it resumes there and finishes; everything it wrote
  is in the emulator's store, nothing on the local disk."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  workdir = f"{gcs_bucket}/run"
  cmd = [sys.executable, "-m", "qdc_jax.main", "--config=configs/arith_lab.py:smoke",
         f"--workdir={workdir}"]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  first = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while "run/checkpoints/3/commit_success.txt" not in gcs_server.object_names(DEFAULT_BUCKET):
    assert first.poll() is None, first.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert not storage.exists(f"{workdir}/report.json")
  res = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Resumed from gs://" in res.stderr
  names = gcs_server.object_names(DEFAULT_BUCKET)
  assert "run/model/model.json" in names and "run/config.json" in names
  rows = storage.read_rows(f"{workdir}/train_metrics.jsonl")
  steps = [r["step"] for r in rows if "loss" in r]  # (the final eval row also says step 6)
  assert steps == [2, 4, 6], steps  # nothing lost, nothing twice
  assert [r["step"] for r in rows if "eval_loss" in r] == [6]
  assert storage.read_json(f"{workdir}/report.json")
  assert not os.path.exists(os.path.join(repo, "gs:"))
