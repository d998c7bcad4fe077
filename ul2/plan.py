"""`ul2 plan`: will this run fit? The train step compiled ahead of time, on nothing.

    ul2 plan --gin_file=gin/runs/pretrain_ul2.gin --num_devices=256 --mesh=1,256,1 \
        --memory_per_device=32GiB [--format=json]

The step is exactly the one `ul2 train` runs (`loop.build`), lowered on
`jax.ShapeDtypeStruct`s that carry the real shardings (the state's, derived from
`jax.eval_shape` and the logical axis rules, and the batch's) and compiled by XLA
for `num_devices` simulated CPU devices. Nothing is allocated. From the compiled
program come the per-device memory (`memory_analysis`: arguments + outputs +
temporaries - what the donated state aliases) and the FLOPs (`cost_analysis`),
set beside `model.flops_per_token`.

Caveats, shown with the numbers: the memory is XLA:CPU's buffer assignment, an
estimate of what the TPU/GPU compilers will do (they fuse and schedule
differently, and keep bfloat16 where the CPU may widen it); XLA's cost analysis
counts a loop body once, so for scanned layers, microbatches, or the chunked
attention and loss that "auto" picks on CPU, the FLOPs come from an extra lowering
(not compiled) of the same step unrolled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GiB = 2**30


def parse_bytes(text: str) -> int:
  """'32GiB', '80 GB', '1.5TiB', '123' -> bytes."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
  if not match or match.group(2).lower() not in _UNITS:
    raise ValueError(f"memory size {text!r}: expected a number with a unit such as "
                     "32GiB, 80GB or 512MiB")
  return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_mesh(text: str):
  """'1,256,1' -> MeshConfig(data=1, fsdp=256, tensor=1); one size may be -1."""
  from ul2 import sharding  # pylint: disable=import-outside-toplevel
  try:
    sizes = [int(s) for s in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise ValueError(f"--mesh={text!r}: expected three sizes D,F,T (data, fsdp, tensor)")
  return sharding.MeshConfig(*sizes)


def _backends_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.backends_are_initialized()


def simulate_devices(num_devices: int) -> None:
  """Makes JAX see `num_devices` CPU devices; must run before JAX starts its backends
  (importing it is fine: TensorFlow does)."""
  if num_devices < 1:
    raise ValueError(f"--num_devices must be positive, got {num_devices}")
  if _backends_started():  # Too late to change the platform: use what there is.
    import jax  # pylint: disable=import-outside-toplevel
    if jax.device_count() < num_devices:
      raise ValueError(f"JAX is already running with {jax.device_count()} devices, "
                       f"fewer than {num_devices}: run `ul2 plan` in a fresh process")
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={num_devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def num_denoisers(task_name: str, default: int = 7) -> int:
  """How many denoisers the task mixes (sizes the per-denoiser loss sums)."""
  try:
    import tasks  # pylint: disable=import-outside-toplevel,unused-import  (registers)
    from ul2 import data  # pylint: disable=import-outside-toplevel
    return max(len(data.task_denoisers(task_name)), 1)
  except Exception:  # pylint: disable=broad-except  (a plan needs no data)
    return default


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `make_plan` found. Bytes are per device unless named total."""
  model: str
  num_devices: int
  mesh: dict[str, int]
  batch_size: int
  lengths: dict[str, int]
  num_microbatches: int
  scan_layers: bool
  remat_policy: str
  attention_impl: str           # The choices `loop.build` made for this mesh.
  loss_impl: str
  param_count: int
  param_bytes_total: int
  opt_state_bytes_total: int
  param_bytes: int
  opt_state_bytes: int
  flops_formula: float          # model.flops_per_token x target tokens per step.
  flops_xla: float              # XLA's count for the whole step (unpartitioned).
  flops_compiled_per_device: float  # The compiled per-device program's count.
  loops_counted_once: bool      # flops_compiled_per_device misses loop iterations.
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  memory_bytes: int             # arguments + outputs + temps - aliased.
  memory_per_device: int | None
  fits: bool | None
  compile_seconds: float

  def verdict(self) -> str:
    if self.memory_per_device is None:
      return "no budget given"
    share = self.memory_bytes / self.memory_per_device
    return (f"{'fits' if self.fits else 'DOES NOT FIT'}: {_gib(self.memory_bytes)} of "
            f"{_gib(self.memory_per_device)} per device ({share:.0%})")

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "verdict": self.verdict()}


def _shard_bytes(tree: Any, shardings: Any) -> tuple[int, int]:
  """(total bytes, bytes on the most loaded device) of an abstract tree."""
  import jax  # pylint: disable=import-outside-toplevel
  total = per_device = 0
  for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(leaf.shape) * leaf.dtype.itemsize
    per_device += math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return total, per_device


def abstract_inputs(setup, config) -> tuple[Any, dict[str, Any], Any]:
  """ShapeDtypeStructs (with shardings) of the train step's (state, batch, rng)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ul2 import checkpoint, features  # pylint: disable=import-outside-toplevel
  state = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding)
           for k, shape in features.batch_shapes(config.batch_size, config.task_feature_lengths,
                                                 config.pack).items()}
  key = jax.eval_shape(jax.random.key, 0)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=setup.state_shardings.step)
  return state, batch, rng


def _lower(config, num_denoisers_: int, mesh):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from ul2 import loop, sharding  # pylint: disable=import-outside-toplevel
  setup = loop.build(config, num_denoisers_, mesh)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
    return setup, setup.train_step.lower(*abstract_inputs(setup, config))


def _flops(cost: Any) -> float:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def make_plan(config, num_devices: int, mesh_config=None,
              memory_per_device: int | None = None, num_denoisers: int = 7) -> Plan:
  """Compiles `config`'s train step for `num_devices` devices; nothing is allocated."""
  import jax  # pylint: disable=import-outside-toplevel
  from ul2 import compiler, model as model_lib, sharding  # pylint: disable=import-outside-toplevel
  if mesh_config is not None:
    config = dataclasses.replace(config, mesh=mesh_config)
  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise ValueError(f"{num_devices} devices asked for, JAX has {len(devices)}")
  mesh = sharding.make_mesh(config.mesh, devices)
  start = time.perf_counter()
  setup, lowered = _lower(config, num_denoisers, mesh)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start

  # What "auto" resolved to for this mesh (`loop.build`): loops over chunks?
  chunk_loops = setup.config.model.attention_impl == "scan" or setup.config.loss.impl == "chunked"
  loops = config.model.scan_layers or config.num_microbatches > 1 or chunk_loops
  if loops:  # Count every layer, microbatch and chunk: lower (only) the unrolled step.
    unrolled = dataclasses.replace(
        config, num_microbatches=1,
        model=dataclasses.replace(config.model, scan_layers=False, attention_impl="xla"),
        loss=dataclasses.replace(config.loss, impl="logits"))
    flops_xla = _flops(_lower(unrolled, num_denoisers, mesh)[1].cost_analysis())
  else:
    flops_xla = _flops(lowered.cost_analysis())
  lengths = dict(config.task_feature_lengths)
  flops_formula = (model_lib.flops_per_token(config.model, lengths["inputs"],
                                             lengths["targets"])
                   * config.batch_size * lengths["targets"])

  params_total, params_device = _shard_bytes(setup.abstract_state.params,
                                             setup.state_shardings.params)
  opt_total, opt_device = _shard_bytes(setup.abstract_state.opt_state,
                                       setup.state_shardings.opt_state)
  memory = compiled.memory_analysis()
  total = compiler.memory_bytes(compiled)
  return Plan(
      model=_describe(config.model),
      num_devices=num_devices,
      mesh=dict(mesh.shape),
      batch_size=config.batch_size,
      lengths=lengths,
      num_microbatches=config.num_microbatches,
      scan_layers=config.model.scan_layers,
      remat_policy=config.model.remat_policy,
      attention_impl=setup.config.model.attention_impl,
      loss_impl=setup.config.loss.impl,
      param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(
          setup.abstract_state.params)),
      param_bytes_total=params_total,
      opt_state_bytes_total=opt_total,
      param_bytes=params_device,
      opt_state_bytes=opt_device,
      flops_formula=flops_formula,
      flops_xla=flops_xla,
      flops_compiled_per_device=_flops(compiled.cost_analysis()),
      loops_counted_once=loops,
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      memory_bytes=total,
      memory_per_device=memory_per_device,
      fits=None if memory_per_device is None else total <= memory_per_device,
      compile_seconds=compile_seconds,
  )


def _describe(m) -> str:
  return (f"{m.num_encoder_layers}+{m.num_decoder_layers} layers, d_model {m.d_model}, "
          f"d_ff {m.d_ff}, {m.num_heads}x{m.head_dim} heads, vocab {m.vocab_size}, "
          f"{m.dtype} activations")


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
  for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{suffix}"
  return f"{n:.3g}"


def format_plan(p: Plan) -> str:
  """A readable table of a plan."""
  mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
  per_device_note = " (loop bodies counted once)" if p.loops_counted_once else ""
  rows = [
      ("model", p.model),
      ("devices / mesh", f"{p.num_devices} / {mesh}"),
      ("batch", f"{p.batch_size} x {p.lengths['inputs']}/{p.lengths['targets']}, "
                f"{p.num_microbatches} microbatch(es); scan_layers={p.scan_layers}, "
                f"remat={p.remat_policy}"),
      ("attention / loss", f"{p.attention_impl} / {p.loss_impl} (chosen for this mesh)"),
      ("parameters", f"{_count(p.param_count)} ({_gib(p.param_bytes_total)}; "
                     f"{_gib(p.param_bytes)} per device)"),
      ("optimiser state", f"{_gib(p.opt_state_bytes_total)} "
                          f"({_gib(p.opt_state_bytes)} per device)"),
      ("FLOPs/step, formula", f"{_count(p.flops_formula)}  (model.flops_per_token)"),
      ("FLOPs/step, XLA", f"{_count(p.flops_xla)}  (x{p.flops_xla / p.flops_formula:.3f}"
                          " of the formula; whole step, remat included)"),
      ("FLOPs/step/device, compiled", f"{_count(p.flops_compiled_per_device)}"
                                      f"{per_device_note}"),
      ("memory/device: arguments", _gib(p.argument_bytes)),
      ("  + outputs", _gib(p.output_bytes)),
      ("  + temporaries", _gib(p.temp_bytes)),
      ("  - aliased (donated)", _gib(p.alias_bytes)),
      ("  = total", _gib(p.memory_bytes)),
      ("verdict", p.verdict()),
      ("compile time", f"{p.compile_seconds:.0f} s (XLA:CPU; an estimate for TPU/GPU)"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

