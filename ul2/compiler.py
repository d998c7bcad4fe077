"""XLA compiler options for ul2's jitted steps, chosen per backend.

CPU: XLA:CPU (jaxlib 0.10) hands dots, elementwise ops and reductions to YNNPACK
fusions by default. In these models its reductions over a non-minor axis and the
elementwise fusions around the attention softmax and the gated MLP's backward are
several times slower than XLA's own emitters. Measured on 2 cores, float32:

  - sum over the batch of a [8, 6, 512, 512] array (the relative position bias
    gradient): 88 ms with YNNPACK, 1.6 ms without;
  - T5-small attention core (softmax(q k^T + bias) v, forward and backward, batch
    8 x 512): 296 ms -> 227 ms;
  - a whole T5-small training step (batch 8, 512/128): 10.2 s -> 8.8 s
    (benchmarks/model_bench.py).

So on CPU ul2 keeps YNNPACK for dots only. Other backends get no options.
"""

from __future__ import annotations

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's)."""
  backend = backend or jax.default_backend()
  return dict(CPU_OPTIONS) if backend == "cpu" else None
