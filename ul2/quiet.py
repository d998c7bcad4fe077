"""Quiet by default: a user sees what they can act on, and errors as one line.

* TensorFlow's native start-up lines (oneDNN, CUDA stubs) are written to file
  descriptor 2 during `import tensorflow`, whatever `TF_CPP_MIN_LOG_LEVEL` says:
  `startup` imports TensorFlow once with descriptor 2 pointed at /dev/null.
* absl (orbax), JAX and asyncio logs, such as orbax's "Given directory is read
  only" or JAX's CPU fallback notice, and exceptions raised where nothing can
  catch them (`sys.unraisablehook`) are turned off; errors reach the user as
  exceptions, printed by `ul2.main` through `root_cause`.

`UL2_TRACEBACK=1` keeps everything (`startup(verbose=True)` does nothing).
This module imports nothing heavy, so `ul2.main` can import it first.
"""

from __future__ import annotations

import logging
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def startup(verbose: bool, tensorflow: bool = True) -> None:
  """Silences native start-up noise and library logs (unless `verbose`); with
  `tensorflow=False` (a verb that never imports it: export) TensorFlow is not
  imported early to silence it, which would cost ~650 MB of RSS for nothing."""
  if verbose:
    return
  for name in ("absl", "jax", "orbax", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  # Orbax's asyncio futures that failed with the error already reported (a full
  # disk) complain again, once each, when they are collected at exit.
  sys.unraisablehook = lambda unraisable: None
  if "tensorflow" in sys.modules or not tensorflow:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except  (reported when it is imported for use)
    pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def root_cause(error: BaseException, limit: int = 300) -> str:
  """The innermost cause of `error` (following `raise ... from`), as one line of at
  most `limit` characters."""
  seen = set()
  while error.__cause__ is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__
  message = getattr(error, "message", None)  # TensorFlow's errors: without the op.
  text = " ".join(str(message if isinstance(message, str) else error).split())
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)  # "{{function_node ...}}" prefixes.
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  if isinstance(error, OSError) and error.strerror:
    text = f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
  if len(text) <= limit:
    return text
  half = (limit - 5) // 2  # The cause is often at the end: keep both ends.
  return f"{text[:half]} ... {text[-half:]}"
