"""A local Google Cloud Storage emulator for tests: the GCS JSON API over HTTP on 127.0.0.1.

The project's `gs://` I/O goes through three independent GCS clients, and all three are pointed
at this one server by environment variables alone (so a child process that inherits the
environment, e.g. `python -m qdc_jax.main ...`, talks to the same server):

  * etils.epath (our files and orbax's metadata): the fsspec backend, i.e. gcsfs, which honours
    STORAGE_EMULATOR_HOST. EPATH_USE_TF=false moves epath off TensorFlow's gfile, whose GCS
    client has no endpoint override (its URLs are fixed to googleapis.com).
  * tensorstore (orbax's array data, OCDBT): its `gcs` kvstore driver honours
    TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING gives it a fixed bearer token so it
    looks for no credentials (no metadata-server probe).
  * google-cloud-storage (orbax calls `storage.Client().get_bucket` to ask whether a bucket has
    a hierarchical namespace before listing or deleting steps): honours STORAGE_EMULATOR_HOST.

`emulator_env(url)` returns the variables. The server is an honest emulator, not a local-path
shortcut: objects live in memory inside the server (query them with `GcsEmulator.object_names`
/ `get_bytes`, or over HTTP), and the clients cannot tell it from GCS at the protocol level
for what they use: object insert (uploadType=media, multipart, resumable), get (metadata and
alt=media with Range), list (prefix, delimiter, pageToken, maxResults, startOffset/endOffset,
includeTrailingDelimiter), patch, delete, copyTo, rewriteTo, moveTo, compose, bucket get /
insert / list / delete, and the generation preconditions (ifGenerationMatch,
ifGenerationNotMatch, ifMetagenerationMatch, ifMetagenerationNotMatch; 412 / 304 like GCS).
Not emulated: object versioning (only the live generation is kept), ACLs/IAM, the batch
endpoint (gcsfs does not use it against an emulator), the XML API, gRPC (gcsfs's zonal/HNS
probe; off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false). As on GCS there are no directories:
a "directory" is a name prefix that exists only while an object is under it, and renaming one
is a copy + delete per object (not atomic); one object is renamed atomically (objects.moveTo).

Use in tests::

  from gcs_emulator import gcs_bucket, gcs_server  # pytest fixtures

  def test_x(gcs_bucket):                          # "gs://test-bucket", empty
    storage.write_text(f"{gcs_bucket}/a.txt", "hi")

  def test_child(gcs_bucket, gcs_server):          # os.environ now holds emulator_env(...)
    subprocess.run([sys.executable, "-m", "qdc_jax.main", f"--workdir={gcs_bucket}/w", ...])
    assert "w/report.json" in gcs_server.object_names("test-bucket")

Standalone (for debugging): `python tests/gcs_emulator.py --port 4443 --bucket test-bucket`.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import copy
import datetime
import hashlib
import json
import os
import re
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from http import server as http_server
from typing import Iterator, Optional

try:  # pragma: no cover - optional speed-up / extra checksum
  import google_crc32c as _crc32c  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  _crc32c = None

DEFAULT_BUCKET = "test-bucket"


def emulator_env(url: str) -> dict[str, str]:
  """The environment variables that point every GCS client of the project at `url`."""
  return {
      # epath: fsspec/gcsfs backend instead of TensorFlow's gfile (no endpoint override).
      "EPATH_USE_TF": "false",
      # gcsfs and google-cloud-storage: the JSON API endpoint.
      "STORAGE_EMULATOR_HOST": url,
      # gcsfs: no credentials lookup (fsspec reads FSSPEC_<protocol>_<kwarg> at import).
      "FSSPEC_GCS_TOKEN": "anon",
      # gcsfs: the plain HTTP client; the default "extended" one asks a gRPC storage-control
      # endpoint for the bucket layout on every call, which an HTTP emulator cannot answer.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # tensorstore's gcs kvstore (orbax array data).
      "TENSORSTORE_GCS_HTTP_URL": url,
      # tensorstore: a fixed bearer token, so it looks for no credentials (metadata server).
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
      # google-cloud-storage: a project, so it does not look one up.
      "GOOGLE_CLOUD_PROJECT": "emulator-project",
  }


# -- the store ----------------------------------------------------------------------------


class _Object:
  __slots__ = ("name", "data", "generation", "metageneration", "content_type", "metadata",
               "created", "updated", "extra")

  def __init__(self, name, data, generation, content_type, metadata, extra):
    self.name = name
    self.data = bytes(data)
    self.generation = generation
    self.metageneration = 1
    self.content_type = content_type or "application/octet-stream"
    self.metadata = metadata
    self.created = self.updated = time.time()
    self.extra = extra  # other settable fields (cacheControl, contentEncoding, ...)


_SETTABLE = ("cacheControl", "contentDisposition", "contentEncoding", "contentLanguage",
             "customTime")


def _rfc3339(t: float) -> str:
  d = datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc)
  return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


class _HttpError(Exception):

  def __init__(self, code: int, message: str, reason: str = ""):
    super().__init__(message)
    self.code, self.message = code, message
    self.reason = reason or {
        400: "invalid", 404: "notFound", 409: "conflict", 412: "conditionNotMet",
        416: "requestedRangeNotSatisfiable"}.get(code, "error")


class _NotModified(Exception):
  pass


class GcsEmulator:
  """The GCS JSON API on 127.0.0.1:<port>, objects in memory. Thread-safe."""

  def __init__(self, host: str = "127.0.0.1", port: int = 0):
    self._lock = threading.RLock()
    self._buckets: dict[str, dict[str, _Object]] = {}
    self._bucket_created: dict[str, float] = {}
    self._uploads: dict[str, dict] = {}
    self._generation = int(time.time() * 1e6)
    self.requests: collections.Counter = collections.Counter()  # (method, user agent kind)
    self.uploads: collections.Counter = collections.Counter()  # uploadType -> completed
    self._httpd = _Server((host, port), _Handler)
    self._httpd.emulator = self
    self.host, self.port = self._httpd.server_address[:2]
    self._thread: Optional[threading.Thread] = None

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self) -> "GcsEmulator":
    self._thread = threading.Thread(target=self._httpd.serve_forever, name="gcs-emulator",
                                    kwargs={"poll_interval": 0.05}, daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    if self._thread is not None:
      self._thread.join(timeout=5)

  # -- direct access (what tests use to look into the store, bypassing every client) ------

  def create_bucket(self, name: str) -> None:
    with self._lock:
      self._buckets.setdefault(name, {})
      self._bucket_created.setdefault(name, time.time())

  def delete_bucket(self, name: str) -> None:
    with self._lock:
      self._buckets.pop(name, None)
      self._bucket_created.pop(name, None)

  def clear_bucket(self, name: str) -> None:
    with self._lock:
      self._buckets.get(name, {}).clear()

  def bucket_names(self) -> list[str]:
    with self._lock:
      return sorted(self._buckets)

  def object_names(self, bucket: str, prefix: str = "") -> list[str]:
    with self._lock:
      return sorted(n for n in self._buckets.get(bucket, {}) if n.startswith(prefix))

  def get_bytes(self, bucket: str, name: str) -> bytes:
    with self._lock:
      return self._buckets[bucket][name].data

  def put_bytes(self, bucket: str, name: str, data: bytes) -> None:
    with self._lock:
      self._insert(bucket, name, data, "application/octet-stream", None, {}, {})

  def generation(self, bucket: str, name: str) -> int:
    with self._lock:
      return self._buckets[bucket][name].generation

  # -- internals -------------------------------------------------------------------------

  def _bucket(self, bucket: str) -> dict[str, _Object]:
    try:
      return self._buckets[bucket]
    except KeyError:
      raise _HttpError(404, "The specified bucket does not exist.") from None

  def _get(self, bucket: str, name: str, q: dict) -> _Object:
    obj = self._bucket(bucket).get(name)
    if obj is None or ("generation" in q and int(q["generation"]) != obj.generation):
      raise _HttpError(404, f"No such object: {bucket}/{name}")
    return obj

  @staticmethod
  def _check(obj: Optional[_Object], q: dict, prefix: str = "", read: bool = False) -> None:
    """GCS preconditions; `prefix` is "Source" for ifSourceGenerationMatch & co."""
    gen = obj.generation if obj is not None else 0
    meta = obj.metageneration if obj is not None else None
    v = q.get(f"if{prefix}GenerationMatch")
    if v is not None and int(v) != gen:
      raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")
    v = q.get(f"if{prefix}GenerationNotMatch")
    if v is not None and int(v) == gen:
      if read:
        raise _NotModified()
      raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")
    v = q.get(f"if{prefix}MetagenerationMatch")
    if v is not None and (meta is None or int(v) != meta):
      raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")
    v = q.get(f"if{prefix}MetagenerationNotMatch")
    if v is not None and meta is not None and int(v) == meta:
      if read:
        raise _NotModified()
      raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")

  def _insert(self, bucket, name, data, content_type, metadata, extra, q) -> _Object:
    if not name:
      raise _HttpError(400, "Required object name is missing.", "required")
    objs = self._bucket(bucket)
    self._check(objs.get(name), q)
    self._generation += 1
    obj = _Object(name, data, self._generation, content_type, metadata, extra)
    objs[name] = obj
    return obj

  def _resource(self, bucket: str, obj: _Object) -> dict:
    qname = urllib.parse.quote(obj.name, safe="")
    r = {
        "kind": "storage#object",
        "id": f"{bucket}/{obj.name}/{obj.generation}",
        "selfLink": f"{self.url}/storage/v1/b/{bucket}/o/{qname}",
        "mediaLink": f"{self.url}/download/storage/v1/b/{bucket}/o/{qname}"
                     f"?generation={obj.generation}&alt=media",
        "name": obj.name,
        "bucket": bucket,
        "generation": str(obj.generation),
        "metageneration": str(obj.metageneration),
        "contentType": obj.content_type,
        "storageClass": "STANDARD",
        "size": str(len(obj.data)),
        "md5Hash": base64.b64encode(hashlib.md5(obj.data).digest()).decode(),
        "etag": base64.b64encode(f"{obj.generation}:{obj.metageneration}".encode()).decode(),
        "timeCreated": _rfc3339(obj.created),
        "updated": _rfc3339(obj.updated),
        "timeStorageClassUpdated": _rfc3339(obj.created),
    }
    if _crc32c is not None:
      r["crc32c"] = base64.b64encode(
          _crc32c.value(obj.data).to_bytes(4, "big")).decode()
    if obj.metadata:
      r["metadata"] = dict(obj.metadata)
    r.update(obj.extra)
    return r

  def _bucket_resource(self, bucket: str) -> dict:
    t = _rfc3339(self._bucket_created.get(bucket, time.time()))
    return {"kind": "storage#bucket", "id": bucket, "name": bucket,
            "selfLink": f"{self.url}/storage/v1/b/{bucket}", "projectNumber": "0",
            "metageneration": "1", "location": "US", "locationType": "multi-region",
            "storageClass": "STANDARD", "etag": "CAE=", "timeCreated": t, "updated": t,
            "iamConfiguration": {"uniformBucketLevelAccess": {"enabled": True}}}

  def _list(self, bucket: str, q: dict) -> dict:
    objs = self._bucket(bucket)
    prefix = q.get("prefix", "")
    delim = q.get("delimiter", "")
    start, end = q.get("startOffset"), q.get("endOffset")
    trailing = q.get("includeTrailingDelimiter", "false").lower() == "true"
    max_results = max(1, min(int(q.get("maxResults", 1000) or 1000), 1000))
    after, skip = "", None
    if q.get("pageToken"):
      tok = json.loads(base64.urlsafe_b64decode(q["pageToken"]).decode())
      after, skip = tok["after"], tok.get("skip")
    items, prefixes, seen, count, token = [], [], set(), 0, None
    last_name = last_entry = ""  # the last name looked at / the last entry returned
    for name in sorted(objs):
      if not name.startswith(prefix) or (start and name < start) or (end and name >= end):
        continue
      if after and name <= after or (skip and name.startswith(skip)):
        continue
      if count >= max_results:
        last_prefix = prefixes[-1] if prefixes and prefixes[-1] == last_entry else None
        token = {"after": last_name, "skip": last_prefix}
        break
      rest = name[len(prefix):]
      if delim and delim in rest:
        p = prefix + rest[:rest.index(delim) + len(delim)]
        if trailing and name == p:
          items.append(self._resource(bucket, objs[name]))
        if p in seen:
          last_name = name
          continue
        seen.add(p)
        prefixes.append(p)
        last_entry = p
      else:
        items.append(self._resource(bucket, objs[name]))
        last_entry = name
      last_name = name
      count += 1
    out = {"kind": "storage#objects"}
    if items:
      out["items"] = items
    if prefixes:
      out["prefixes"] = prefixes
    if token is not None:
      out["nextPageToken"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
    return out


class _Server(socketserver.ThreadingMixIn, http_server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 128
  emulator: GcsEmulator

  def handle_error(self, request, client_address):
    if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      return  # a client closed its connection: normal for cancelled requests
    super().handle_error(request, client_address)


def _parse_multipart(body: bytes, boundary: bytes) -> list[tuple[dict, bytes]]:
  """multipart/related parts as (headers, payload); accepts CRLF or LF line ends."""
  delim = b"--" + boundary
  positions = [m.start() for m in re.finditer(re.escape(delim), body)
               if m.start() == 0 or body[m.start() - 1:m.start()] == b"\n"]
  parts = []
  for i, pos in enumerate(positions[:-1]):
    chunk = body[pos + len(delim):positions[i + 1]]
    if chunk.startswith(b"--"):
      break
    if chunk.startswith(b"\r\n"):
      chunk = chunk[2:]
    elif chunk.startswith(b"\n"):
      chunk = chunk[1:]
    if chunk.endswith(b"\r\n"):
      chunk = chunk[:-2]
    elif chunk.endswith(b"\n"):
      chunk = chunk[:-1]
    crlf, lf = chunk.find(b"\r\n\r\n"), chunk.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
      head, payload = chunk[:crlf], chunk[crlf + 4:]
    elif lf >= 0:
      head, payload = chunk[:lf], chunk[lf + 2:]
    else:
      head, payload = chunk, b""
    headers = {}
    for line in head.decode("latin-1").splitlines():
      if ":" in line:
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    parts.append((headers, payload))
  return parts


def _byte_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
  """[start, end) from a Range header; None for the whole object."""
  if not header:
    return None
  m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
  if not m or (not m.group(1) and not m.group(2)):
    return None
  if not m.group(1):  # suffix: the last n bytes
    n = int(m.group(2))
    return max(0, size - n), size
  start = int(m.group(1))
  end = min(size, int(m.group(2)) + 1) if m.group(2) else size
  if start >= size:
    if size == 0 and start == 0:
      return None
    raise _HttpError(416, "The requested range cannot be satisfied.")
  return start, end


def _agent(ua: str) -> str:
  ua = ua.lower()
  for k in ("tensorstore", "gcsfs", "gcloud-python", "google-cloud-storage", "python-urllib"):
    if k in ua:
      return k
  return ua.split("/")[0] or "unknown"


class _Handler(http_server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server: _Server

  def setup(self):
    super().setup()
    # Headers and body go out in separate writes; without this, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request.
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass

  # -- plumbing --------------------------------------------------------------------------

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      out = bytearray()
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
          while self.rfile.readline().strip():
            pass
          return bytes(out)
        out += self.rfile.read(size)
        self.rfile.readline()
    n = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(n) if n else b""

  def _send(self, code: int, body: bytes = b"", content_type: str = "application/json",
            headers: Optional[dict] = None) -> None:
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    if code not in (204, 304):
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD" and code not in (204, 304) and body:
      try:
        self.wfile.write(body)
      except (BrokenPipeError, ConnectionResetError):
        self.close_connection = True  # the client gave up (e.g. gcsfs cancels a losing race)

  def _json(self, code: int, value) -> None:
    self._send(code, json.dumps(value).encode())

  def _dispatch(self) -> None:
    em = self.server.emulator
    body = self._body()
    em.requests[(self.command, _agent(self.headers.get("User-Agent", "")))] += 1
    parsed = urllib.parse.urlsplit(self.path)
    q = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    path = parsed.path
    try:
      with em._lock:  # pylint: disable=protected-access
        self._route(em, self.command, path, q, body)
    except _NotModified:
      self._send(304)
    except _HttpError as e:
      self._json(e.code, {"error": {"code": e.code, "message": e.message, "errors": [
          {"domain": "global", "reason": e.reason, "message": e.message}]}})
    except (ValueError, KeyError) as e:
      self._json(400, {"error": {"code": 400, "message": f"Invalid request: {e!r}",
                                 "errors": [{"reason": "invalid", "message": repr(e)}]}})

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

  # -- routes ----------------------------------------------------------------------------

  def _route(self, em: GcsEmulator, method: str, path: str, q: dict, body: bytes) -> None:
    # pylint: disable=protected-access
    if path.startswith("/upload/storage/v1/b/"):
      bucket, rest = path[len("/upload/storage/v1/b/"):].split("/", 1)
      if rest != "o":
        raise _HttpError(404, f"Not found: {path}")
      return self._upload(em, method, urllib.parse.unquote(bucket), q, body)
    download = path.startswith("/download/storage/v1/")
    if download:
      path = path[len("/download"):]
    if not path.startswith("/storage/v1/b"):
      raise _HttpError(404, f"Not found: {path}")
    rest = path[len("/storage/v1/b"):]
    if rest in ("", "/"):
      if method == "GET":
        return self._json(200, {"kind": "storage#buckets", "items": [
            em._bucket_resource(b) for b in sorted(em._buckets)]})
      if method == "POST":
        name = json.loads(body or b"{}")["name"]
        if name in em._buckets:
          raise _HttpError(409, "Your previous request to create the named bucket succeeded "
                           "and you already own it.")
        em.create_bucket(name)
        return self._json(200, em._bucket_resource(name))
      raise _HttpError(405, "Method not allowed")
    bucket, _, rest = rest[1:].partition("/")
    bucket = urllib.parse.unquote(bucket)
    if not rest:
      if method in ("GET", "HEAD"):
        em._bucket(bucket)
        return self._json(200, em._bucket_resource(bucket))
      if method == "DELETE":
        if em._bucket(bucket):
          raise _HttpError(409, "The bucket you tried to delete is not empty.")
        em.delete_bucket(bucket)
        return self._send(204)
      if method == "PATCH":
        em._bucket(bucket)
        return self._json(200, em._bucket_resource(bucket))
      raise _HttpError(405, "Method not allowed")
    if rest == "o":
      if method == "GET":
        return self._json(200, em._list(bucket, q))
      if method == "POST":  # the simple upload path without /upload (rare)
        return self._upload(em, method, bucket, q, body)
      raise _HttpError(405, "Method not allowed")
    if not rest.startswith("o/"):
      raise _HttpError(404, f"Not found: {path}")
    rest = rest[2:]
    m = re.fullmatch(r"(.+?)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)", rest)
    if m and method == "POST":
      return self._copy(em, bucket, urllib.parse.unquote(m.group(1)), m.group(2),
                        urllib.parse.unquote(m.group(3)), urllib.parse.unquote(m.group(4)),
                        q, body)
    m = re.fullmatch(r"(.+?)/moveTo/o/(.+)", rest)
    if m and method == "POST":
      return self._move(em, bucket, urllib.parse.unquote(m.group(1)),
                        urllib.parse.unquote(m.group(2)), q)
    m = re.fullmatch(r"(.+?)/compose", rest)
    if m and method == "POST":
      return self._compose(em, bucket, urllib.parse.unquote(m.group(1)), q, body)
    name = urllib.parse.unquote(rest)
    objs = em._bucket(bucket)
    if method in ("GET", "HEAD"):
      obj = em._get(bucket, name, q)
      em._check(obj, q, read=True)
      if q.get("alt") == "media" or download:
        return self._media(em, bucket, obj)
      return self._json(200, em._resource(bucket, obj))
    if method == "DELETE":
      obj = em._get(bucket, name, q)
      em._check(obj, q)
      del objs[name]
      return self._send(204)
    if method in ("PATCH", "PUT"):
      obj = em._get(bucket, name, q)
      em._check(obj, q)
      patch = json.loads(body or b"{}")
      if "metadata" in patch:
        md = dict(obj.metadata or {}) if method == "PATCH" else {}
        for k, v in (patch["metadata"] or {}).items():
          if v is None:
            md.pop(k, None)
          else:
            md[k] = v
        obj.metadata = md
      if "contentType" in patch:
        obj.content_type = patch["contentType"]
      for k in _SETTABLE:
        if k in patch:
          obj.extra[k] = patch[k]
      obj.metageneration += 1
      obj.updated = time.time()
      return self._json(200, em._resource(bucket, obj))
    raise _HttpError(405, "Method not allowed")

  def _media(self, em: GcsEmulator, bucket: str, obj: _Object) -> None:
    r = _byte_range(self.headers.get("Range"), len(obj.data))
    res = em._resource(bucket, obj)  # pylint: disable=protected-access
    hashes = f"md5={res['md5Hash']}" + (f",crc32c={res['crc32c']}" if "crc32c" in res else "")
    headers = {
        "x-goog-generation": str(obj.generation),
        "x-goog-metageneration": str(obj.metageneration),
        "x-goog-stored-content-length": str(len(obj.data)),
        "x-goog-stored-content-encoding": "identity",
        "x-goog-storage-class": "STANDARD",
        "ETag": f'"{res["etag"]}"',
        "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(obj.updated)),
        "Accept-Ranges": "bytes",
    }
    if r is None:
      headers["x-goog-hash"] = hashes
      return self._send(200, obj.data, obj.content_type, headers)
    start, end = r
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(obj.data)}"
    return self._send(206, obj.data[start:end], obj.content_type, headers)

  def _upload(self, em: GcsEmulator, method: str, bucket: str, q: dict, body: bytes) -> None:
    # pylint: disable=protected-access
    kind = q.get("uploadType", "media")
    em._bucket(bucket)
    if kind == "media":
      obj = em._insert(bucket, q.get("name", ""), body, self.headers.get("Content-Type"),
                       None, {}, q)
      em.uploads["media"] += 1
      return self._json(200, em._resource(bucket, obj))
    if kind == "multipart":
      ctype = self.headers.get("Content-Type", "")
      m = re.search(r'boundary="?([^";]+)"?', ctype)
      if not m:
        raise _HttpError(400, "Missing multipart boundary.")
      parts = _parse_multipart(body, m.group(1).encode())
      if len(parts) < 2:
        raise _HttpError(400, "A multipart upload needs a metadata part and a media part.")
      meta = json.loads(parts[0][1] or b"{}")
      data_type = parts[1][0].get("content-type")
      obj = em._insert(bucket, meta.get("name") or q.get("name", ""), parts[1][1],
                       meta.get("contentType") or data_type, meta.get("metadata"),
                       {k: meta[k] for k in _SETTABLE if k in meta}, q)
      em.uploads["multipart"] += 1
      return self._json(200, em._resource(bucket, obj))
    if kind != "resumable":
      raise _HttpError(400, f"Invalid uploadType: {kind}")
    upload_id = q.get("upload_id")
    if upload_id is None:  # initiate
      meta = json.loads(body or b"{}")
      name = meta.get("name") or q.get("name", "")
      if not name:
        raise _HttpError(400, "Required object name is missing.", "required")
      em._check(em._buckets[bucket].get(name), q)  # fail early, like GCS
      upload_id = hashlib.sha1(f"{bucket}/{name}/{time.time_ns()}".encode()).hexdigest()
      em._uploads[upload_id] = {
          "bucket": bucket, "name": name, "data": bytearray(), "q": q,
          "content_type": meta.get("contentType") or self.headers.get("X-Upload-Content-Type"),
          "metadata": meta.get("metadata"),
          "extra": {k: meta[k] for k in _SETTABLE if k in meta}}
      loc = (f"{em.url}/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o"
             f"?uploadType=resumable&upload_id={upload_id}")
      return self._send(200, b"", headers={"Location": loc, "X-GUploader-UploadID": upload_id})
    up = em._uploads.get(upload_id)
    if up is None:
      raise _HttpError(404, "No such upload.")
    if method == "DELETE":
      del em._uploads[upload_id]
      return self._send(499)
    total = None
    cr = self.headers.get("Content-Range")
    if cr:
      m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", cr)
      if not m:
        raise _HttpError(400, f"Invalid Content-Range: {cr}")
      if m.group(3) != "*":
        total = int(m.group(3))
      if m.group(1) is not None:
        first = int(m.group(1))
        have = len(up["data"])
        if first > have:
          raise _HttpError(400, f"Invalid request: chunk starts at {first}, have {have}")
        up["data"][first:] = body  # overlapping resend replaces the tail
    else:  # a whole upload in one PUT
      up["data"][:] = body
      total = len(up["data"])
    if total is not None and len(up["data"]) >= total:
      del em._uploads[upload_id]
      obj = em._insert(up["bucket"], up["name"], bytes(up["data"][:total]),
                       up["content_type"], up["metadata"], up["extra"], up["q"])
      em.uploads["resumable"] += 1
      return self._json(200, em._resource(up["bucket"], obj))
    headers = {"X-GUploader-UploadID": upload_id}
    if up["data"]:
      headers["Range"] = f"bytes=0-{len(up['data']) - 1}"
    return self._send(308, b"", headers=headers)

  def _copy(self, em: GcsEmulator, sb: str, sn: str, verb: str, db: str, dn: str, q: dict,
            body: bytes) -> None:
    # pylint: disable=protected-access
    src = em._get(sb, sn, {"generation": q["sourceGeneration"]} if "sourceGeneration" in q
                  else {})
    em._check(src, q, prefix="Source")
    meta = json.loads(body) if body else {}
    obj = em._insert(db, dn, src.data, meta.get("contentType") or src.content_type,
                     meta.get("metadata", src.metadata),
                     {**src.extra, **{k: meta[k] for k in _SETTABLE if k in meta}}, q)
    res = em._resource(db, obj)
    if verb == "copyTo":
      return self._json(200, res)
    return self._json(200, {"kind": "storage#rewriteResponse", "done": True,
                            "totalBytesRewritten": str(len(obj.data)),
                            "objectSize": str(len(obj.data)), "resource": res})

  def _move(self, em: GcsEmulator, bucket: str, sn: str, dn: str, q: dict) -> None:
    """objects.move: an atomic rename within one bucket (source gone, new generation)."""
    # pylint: disable=protected-access
    src = em._get(bucket, sn, {"generation": q["sourceGeneration"]} if "sourceGeneration" in q
                  else {})
    em._check(src, q, prefix="Source")
    objs = em._bucket(bucket)
    obj = em._insert(bucket, dn, src.data, src.content_type, src.metadata, dict(src.extra), q)
    if sn != dn:
      del objs[sn]
    return self._json(200, em._resource(bucket, obj))

  def _compose(self, em: GcsEmulator, bucket: str, name: str, q: dict, body: bytes) -> None:
    # pylint: disable=protected-access
    req = json.loads(body or b"{}")
    data = bytearray()
    for s in req.get("sourceObjects", []):
      src = em._get(bucket, s["name"], {"generation": s["generation"]} if "generation" in s
                    else {})
      cond = (s.get("objectPreconditions") or {}).get("ifGenerationMatch")
      if cond is not None and int(cond) != src.generation:
        raise _HttpError(412, "At least one of the pre-conditions you specified did not hold.")
      data += src.data
    dest = req.get("destination") or {}
    obj = em._insert(bucket, name, data, dest.get("contentType"), dest.get("metadata"),
                     {k: dest[k] for k in _SETTABLE if k in dest}, q)
    return self._json(200, em._resource(bucket, obj))


# -- client-side setup for this process -----------------------------------------------------


def reset_client_caches() -> None:
  """Forget GCS clients that this process already built (they hold an endpoint/credentials).

  Env vars are all a fresh process needs; a process that already used gcsfs, epath's fsspec
  backend or orbax's bucket lookup keeps clients built for the previous settings.
  """
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass
  try:
    from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass
  try:
    from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
    gcs_utils.get_bucket.cache_clear()
  except (ImportError, AttributeError):
    pass


@contextlib.contextmanager
def _fsspec_config(env: dict[str, str]) -> Iterator[None]:
  """fsspec reads FSSPEC_* at import: apply them to its live config while inside."""
  try:
    import fsspec.config  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  conf = fsspec.config.conf
  saved = {p: copy.deepcopy(conf[p]) for p in ("gcs", "gs") if p in conf}
  fsspec.config.set_conf_env(conf, {k: v for k, v in env.items() if k.startswith("FSSPEC_")})
  try:
    yield
  finally:
    for p in ("gcs", "gs"):
      conf.pop(p, None)
    conf.update(saved)


@contextlib.contextmanager
def _plain_gcsfs() -> Iterator[None]:
  """gcsfs's plain HTTP class for protocols gcs/gs while inside (GCSFS_EXPERIMENTAL_...).

  Needed only when gcsfs was imported (choosing its "extended" class) before the env var was
  set; a fresh process reads the env var at import and needs none of this.
  """
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    import gcsfs  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield
    return
  if gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem:
    yield
    return
  saved = {p: fsspec.registry.get(p) for p in ("gcs", "gs")}
  for p in saved:
    fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
  try:
    yield
  finally:
    for p, cls in saved.items():
      if cls is not None:
        fsspec.register_implementation(p, cls, clobber=True)
      else:
        sys.modules["fsspec.registry"]._registry.pop(p, None)  # pylint: disable=protected-access


@contextlib.contextmanager
def use_emulator(em: GcsEmulator) -> Iterator[dict[str, str]]:
  """Point this process's GCS clients (and children it starts) at `em`; restore on exit.

  Yields the variables set (`emulator_env(em.url)`); a child started inside inherits them.
  GOOGLE_APPLICATION_CREDENTIALS is removed while inside, so no real credential is ever read.
  """
  env = emulator_env(em.url)
  saved = {k: os.environ.get(k) for k in (*env, "GOOGLE_APPLICATION_CREDENTIALS")}
  os.environ.update(env)
  os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  reset_client_caches()
  try:
    with _fsspec_config(env), _plain_gcsfs():
      yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    reset_client_caches()


_shared: Optional[GcsEmulator] = None
_shared_lock = threading.Lock()


def shared_emulator() -> GcsEmulator:
  """The one emulator of this process (started on first use, stopped at exit).

  One per process rather than per test module, so that every client, whatever it cached,
  sees the same endpoint and the same objects.
  """
  global _shared
  with _shared_lock:
    if _shared is None:
      _shared = GcsEmulator().start()
      atexit.register(_shared.stop)
    return _shared


# -- pytest fixtures ------------------------------------------------------------------------

try:
  import pytest  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - standalone use
  pytest = None

if pytest is not None:

  @pytest.fixture(scope="session")
  def gcs_server() -> GcsEmulator:
    """The emulator (one per process, on a free 127.0.0.1 port): `.url`, `.object_names`..."""
    return shared_emulator()

  @pytest.fixture
  def gcs_bucket(gcs_server: GcsEmulator) -> Iterator[str]:  # pylint: disable=redefined-outer-name
    """`gs://test-bucket`, empty, with this process and its children pointed at the emulator.

    Inside the test os.environ holds `emulator_env(gcs_server.url)`, so a subprocess started
    with the inherited environment uses the same emulator.
    """
    gcs_server.delete_bucket(DEFAULT_BUCKET)
    gcs_server.create_bucket(DEFAULT_BUCKET)
    with use_emulator(gcs_server):
      yield f"gs://{DEFAULT_BUCKET}"
    gcs_server.delete_bucket(DEFAULT_BUCKET)


def _main() -> None:  # pragma: no cover - debugging aid
  import argparse  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--port", type=int, default=4443)
  ap.add_argument("--bucket", action="append", default=[])
  args = ap.parse_args()
  em = GcsEmulator(port=args.port)
  for b in args.bucket or [DEFAULT_BUCKET]:
    em.create_bucket(b)
  print(f"serving {em.url}; environment:", flush=True)
  for k, v in emulator_env(em.url).items():
    print(f"  export {k}={v}", flush=True)
  em.start()
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    em.stop()


if __name__ == "__main__":
  _main()
