"""Training metrics: sums reduced on device, turned into numbers on the host, written
to `metrics.jsonl`, TensorBoard and a one-line console summary.

The train and eval steps return *sums* (of losses, target tokens, correct
predictions, per denoiser) so that accumulating over microbatches, steps and hosts
is plain addition; `summarize` divides once, at logging time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

# Peak dense bf16 FLOP/s per device, for MFU. Unknown kinds (CPU) report no MFU
# unless `peak_flops_per_device` is configured.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
}


def peak_flops(device_kind: str, configured: float | None = None) -> float | None:
  if configured:
    return configured
  return PEAK_FLOPS.get(device_kind)


def summarize(sums: Mapping[str, Any], denoiser_names: Sequence[str],
              prefix: str = "") -> dict[str, float]:
  """Sums from `loss_sums` (possibly added over many steps) -> mean metrics.

  `loss` is the mean per-token loss (cross entropy + z-loss) over real target
  tokens; `loss/<denoiser>` the same over the tokens each denoiser produced,
  reported only for denoisers present.
  """
  tokens = float(sums["tokens"])
  out = {
      f"{prefix}loss": float(sums["loss"]) / max(tokens, 1.0),
      f"{prefix}cross_entropy": float(sums["cross_entropy"]) / max(tokens, 1.0),
      f"{prefix}accuracy": float(sums["correct"]) / max(tokens, 1.0),
      f"{prefix}target_tokens": tokens,
  }
  per_loss = np.asarray(sums["denoiser_loss"])
  per_tokens = np.asarray(sums["denoiser_tokens"])
  for name, loss, count in zip(denoiser_names, per_loss, per_tokens):
    if count > 0:
      out[f"{prefix}loss/{name}"] = float(loss) / float(count)
  return out


class MetricsWriter:
  """Writes `metrics.jsonl` and TensorBoard events; only process 0 writes anything.

  `model_dir` is any `etils.epath` path: local, or an object store (`gs://`).
  """

  def __init__(self, model_dir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = {}
    self._model_dir = epath.Path(model_dir)
    if enabled:
      self._jsonl = _Lines(self._model_dir / "metrics.jsonl")

  def _tensorboard(self, kind: str):
    if kind not in self._tb:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      logdir = self._model_dir / "tensorboard" / kind
      if _on_object_store(logdir):
        _write_events_through_epath(os.fspath(logdir).split("://")[0])
      # The name has the second and the host; this makes it unique when a run is
      # reopened within the same second (events files are never appended to).
      self._tb[kind] = SummaryWriter(os.fspath(logdir), filename_suffix=(
          f".{os.getpid()}.{next(_EVENT_FILES)}"))
    return self._tb[kind]

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.append(json.dumps(record) + "\n")
    tb = self._tensorboard(kind)
    for name, value in metrics.items():
      if isinstance(value, (int, float)) and math.isfinite(value):
        tb.add_scalar(name.removeprefix("eval/"), value, int(step))
    tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    for tb in self._tb.values():
      tb.close()


_EVENT_FILES = itertools.count()


def _on_object_store(path: epath.Path) -> bool:
  return "://" in os.fspath(path)


class _Lines:
  """A text file that grows by whole lines.

  A run killed mid-write leaves a partial last line: it is cut before appending.
  (After a resume, steps between the last checkpoint and the crash appear twice,
  with equal values: the resumed run recomputes them exactly.)

  A local file is appended to and flushed. An object (`gs://`) cannot be appended
  to, so its text is kept here and every `append` uploads the whole object again:
  one write, atomic, so a reader never sees a torn line there.
  """

  def __init__(self, path: epath.Path):
    self._path = path
    self._file = None
    if _on_object_store(path):
      text = path.read_text() if path.exists() else ""
      self._text = text[:text.rfind("\n") + 1]
    else:
      _drop_torn_last_line(path)
      self._file = open(path, "a", encoding="utf-8")

  def append(self, text: str) -> None:
    if self._file is None:
      self._text += text
      self._path.write_text(self._text)
    else:
      self._file.write(text)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def _drop_torn_last_line(path: epath.Path) -> None:
  if not path.exists():
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


class _EventFile:
  """A TensorBoard event file on an object store, written through `etils.epath`:
  objects cannot be appended to, so the records are kept and each flush uploads the
  whole file (as tensorboardX's own `gs://` writer does, without its separate GCS
  client). A resumed run starts a new event file."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._records = bytearray()
    self._flushed = 0

  def write(self, data: bytes) -> None:
    self._records += data

  def flush(self) -> None:
    if len(self._records) != self._flushed:
      self._path.write_bytes(bytes(self._records))
      self._flushed = len(self._records)

  def close(self) -> None:
    self.flush()


class _EventFiles:
  """tensorboardX's writer factory for a URI scheme (`record_writer.open_file`)."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores have no directories to make.


def _write_events_through_epath(scheme: str) -> None:
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory(scheme, _EventFiles())


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def console_line(step: int, total_steps: int, metrics: Mapping[str, float],
                 denoiser_names: Sequence[str]) -> str:
  """`step 120/300 | loss 5.213 | R1 5.0 R2 5.1 ... | 12,345 tok/s | MFU 41% | ETA 1m05s`."""
  parts = [f"step {step}/{total_steps}", f"loss {metrics['loss']:.3f}"]
  per = [f"{n} {metrics[f'loss/{n}']:.2f}" for n in denoiser_names if f"loss/{n}" in metrics]
  if per:
    parts.append(" ".join(per))
  if "tokens_per_second" in metrics:
    parts.append(f"{metrics['tokens_per_second']:,.0f} tok/s")
  if metrics.get("mfu") is not None:
    parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
  if "eta_seconds" in metrics:
    parts.append(f"ETA {_duration(metrics['eta_seconds'])}")
  return " | ".join(parts)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Stopwatch:
  """Wall time between `lap()` calls, for throughput and ETA."""

  def __init__(self):
    self._last = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    elapsed, self._last = now - self._last, now
    return elapsed


def log(message: str) -> None:
  print(message, file=sys.stdout, flush=True)


def warn(message: str) -> None:
  """A warning the user can act on: one line on stderr."""
  print(message, file=sys.stderr, flush=True)
