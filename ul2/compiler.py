"""XLA compiler options for ul2's jitted steps, chosen per backend and dtype.

CPU: XLA:CPU (jaxlib 0.10) hands dots, elementwise ops and reductions to YNNPACK
fusions by default. In these models its reductions over a non-minor axis and the
elementwise fusions around the attention softmax and the gated MLP's backward are
several times slower than XLA's own emitters, so ul2 keeps YNNPACK for dots only:
in float32 as dot fusions (`LIBRARY_FUSION_TYPE_DOT`), in bfloat16 as individual
dots (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`), whose bfloat16 x bfloat16 -> float32
kernels run at about twice the float32 rate where YNNPACK's dot fusions run
bfloat16 at a fraction of it. benchmarks/README.md has the measurements behind
each choice. Other backends get no options.

`compile_fitting` compiles a step and checks XLA's memory analysis of it against
the device's memory before it runs, so lengths that cannot fit are one line
instead of an out-of-memory error (or, on CPU, the kernel's OOM kill).
"""

from __future__ import annotations

import os
from typing import Any

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"
# Per activation dtype (`ul2.model.ModelConfig.dtype`); float16 as float32.
CPU_OPTIONS = {
    "float32": {_YNN: "LIBRARY_FUSION_TYPE_DOT"},
    "bfloat16": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def compiler_options(platform: str | None = None, dtype: str = "float32"
                     ) -> dict[str, str] | None:
  """Options for `jax.jit(..., compiler_options=...)` of a step whose activations are
  `dtype`, on `platform` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return None
  return dict(CPU_OPTIONS.get(dtype, CPU_OPTIONS["float32"]))


def inference_options(platform: str | None = None, dtype: str = "float32"
                      ) -> dict[str, str] | None:
  """Options for the jitted decoding and scoring of `ul2.infer`: on CPU, YNNPACK
  for individual dots in both dtypes. Forward only, the float32 dot fusions lose:
  they take the elementwise work around a dot (the gated MLP's activation, RMSNorm)
  into YNNPACK, with broadcast constants materialised at full activation size
  (benchmarks/README.md, decode_bench.py)."""
  del dtype  # The same choice for both dtypes: bfloat16's.
  return compiler_options(platform, "bfloat16")


def memory_bytes(compiled: jax.stages.Compiled) -> int | None:
  """Bytes one device needs to run `compiled`: arguments, outputs and temporaries,
  less the donated buffers its outputs reuse (XLA's memory analysis)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def device_memory(device: jax.Device | None = None) -> tuple[int | None, int]:
  """(bytes, devices sharing them): a GPU's or TPU's allocator limit, one device; on
  CPU, the host's physical memory, shared by all of its local devices."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), 1
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), jax.local_device_count()
    except (ValueError, OSError):
      return None, 1
  return None, 1


def compile_fitting(jitted: Any, *args: Any, what: str = "the train step",
                    limit: tuple[int | None, int] | None = None) -> jax.stages.Compiled:
  """Compiles `jitted` for `args` and checks that it fits the device's memory (`limit`:
  `device_memory()` unless given); a ValueError in one line if it does not, before
  anything runs. The compiled step is what the caller then runs."""
  compiled = jitted.lower(*args).compile()
  need = memory_bytes(compiled)
  available, sharing = limit or device_memory()
  if need is not None and available and need * sharing > available:
    per_device = available / sharing
    raise ValueError(
        f"{what} needs {need / 2**30:.2f} GiB per device, more than the "
        f"{per_device / 2**30:.2f} GiB each of the {sharing} device(s) has; lower "
        "BATCH_SIZE or TASK_FEATURE_LENGTHS, raise loop.TrainConfig.num_microbatches, or set "
        "model.ModelConfig.remat_policy (`ul2 plan` estimates this before a run)")
  return compiled
