"""Training metrics: sums reduced on device, turned into numbers on the host, written
to `metrics.jsonl`, TensorBoard and a one-line console summary.

The train and eval steps return *sums* (of losses, target tokens, correct
predictions, per denoiser) so that accumulating over microbatches, steps and hosts
is plain addition; `summarize` divides once, at logging time.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

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
  """Writes `metrics.jsonl` and TensorBoard events; only process 0 writes anything."""

  def __init__(self, model_dir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = {}
    self._model_dir = pathlib.Path(model_dir)
    if enabled:
      path = self._model_dir / "metrics.jsonl"
      _drop_torn_last_line(path)
      self._jsonl = open(path, "a", encoding="utf-8")

  def _tensorboard(self, kind: str):
    if kind not in self._tb:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb[kind] = SummaryWriter(str(self._model_dir / "tensorboard" / kind))
    return self._tb[kind]

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
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


def _drop_torn_last_line(path: pathlib.Path) -> None:
  """A run killed mid-write leaves a partial last line: cut it before appending.

  (After a resume, steps between the last checkpoint and the crash appear twice,
  with equal values: the resumed run recomputes them exactly.)
  """
  if not path.exists():
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


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
