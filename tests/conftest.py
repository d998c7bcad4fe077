"""Test setup: 8 simulated CPU devices for JAX, TensorFlow kept off accelerators.

XLA_FLAGS must be set before jax is first imported, hence here.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gs:// through gcsfs, not TensorFlow's gfile, whose GCS client cannot be pointed at
# the emulator of tests/test_gcs.py (local paths are unaffected). etils reads this
# once per process, at its first path, hence here.
os.environ["EPATH_USE_TF"] = "false"

# One persistent XLA compilation cache for the session, inherited by the `ul2`
# processes the tests start: identical programs (the same tiny train step in
# several processes) compile once. Keyed by the program and flags, so it changes
# no result, only the time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ul2-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
