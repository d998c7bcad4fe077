"""Checkpoints: an orbax `CheckpointManager` under `<model_dir>/checkpoints/`.

Each step directory holds three items:

* ``params``    -- the model parameters (what `ul2 export` reads alone),
* ``opt_state`` -- the optimiser state,
* ``meta``      -- JSON: the step, the data position (batches consumed by the
  input pipeline) and what that position is relative to (task, seed, batch size).

Saves are asynchronous and atomic: orbax writes into a temporary directory and
renames it when every process has finished, so a crash mid-save leaves the previous
checkpoint as the latest one. Every process calls every method (orbax coordinates
multi-host saves); restore takes abstract arrays carrying their target shardings,
so a checkpoint restores directly sharded onto any mesh.

Integrity: `meta` records a fingerprint of the parameters and of the optimiser
state (exact integer sums over their bits, so independent of the sharding and
the number of processes) and a hash of the rest of itself. `restore` recomputes
them on what it read and raises `Unreadable` on any difference, as it does for
anything orbax cannot read (a truncated chunk, a missing item, garbage metadata);
`restore_newest_good` falls back from a bad step to the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ul2 import quiet


class Unreadable(ValueError):
  """A checkpoint step that cannot be restored or does not match its checksums."""

  def __init__(self, step: int, reason: str, message: str | None = None):
    super().__init__(message or f"checkpoint step {step} is unreadable: {reason}")
    self.step, self.reason = step, reason


def _bits(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 values (one per element)."""
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
  """Per leaf: the sum of its bits and a position-weighted sum, modulo 2**32.

  Integer sums are exact in any order, so the result does not depend on how the
  leaves are sharded; a flipped bit changes the first sum, a swap the second.
  """
  sums = []
  for x in leaves:
    bits = _bits(x).reshape(-1)
    weights = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(2654435761) + jnp.uint32(1)
    sums.append(jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)]))
  return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)


def chunk_sums(x: np.ndarray, offset: int = 0, block: int = 1 << 20) -> np.ndarray:
  """`_leaf_sums` of one leaf, in numpy, for a contiguous run of its flat elements that
  starts at `offset`: the sums of a leaf's chunks add up (modulo 2**32) to its own.
  Works through `block` elements at a time, so its temporaries stay a few MB."""
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  flat = np.ascontiguousarray(x).reshape(-1).view(unsigned)
  total = np.zeros(2, np.uint32)
  for start in range(0, flat.size, block):
    bits = flat[start:start + block].astype(np.uint32)
    index = np.arange(offset + start, offset + start + bits.size,
                      dtype=np.uint64).astype(np.uint32)
    weights = index * np.uint32(2654435761) + np.uint32(1)
    total += np.array([bits.sum(dtype=np.uint32), (bits * weights).sum(dtype=np.uint32)],
                      np.uint32)
  return total


def _digest(specs: list[tuple[tuple[int, ...], str]], sums: np.ndarray) -> str:
  digest = hashlib.sha256(repr(specs).encode())
  digest.update(np.asarray(sums, np.uint32).reshape(-1, 2).tobytes())
  return digest.hexdigest()[:32]


def fingerprint(tree: Any) -> str:
  """A hex digest of the values, shapes and dtypes of the arrays in `tree`."""
  leaves = jax.tree.leaves(tree)
  return _digest([(x.shape, str(x.dtype)) for x in leaves], np.asarray(_leaf_sums(leaves)))


def _meta_digest(meta: dict[str, Any]) -> str:
  rest = {k: v for k, v in meta.items() if k != "checksums"}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:32]


class Checkpointer:
  """Save and restore (params, opt_state, meta) by step."""

  def __init__(self, model_dir: str | os.PathLike, *, keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    path = epath.Path(model_dir)  # Local, or an object store (gs://).
    self.directory = (path if "://" in os.fspath(path) else path.absolute()) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("params", "opt_state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
    """Starts saving `step` (returns before the write ends when asynchronous)."""
    meta = {**meta, "step": int(step)}
    meta["checksums"] = {"params": fingerprint(params), "opt_state": fingerprint(opt_state),
                         "meta": _meta_digest(meta)}
    self._manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )

  def restore(self, step: int, abstract_params: Any,
              abstract_opt_state: Any | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Restores `step` onto the shardings carried by the abstract trees, verified.

    With `abstract_opt_state=None` only the parameters are read (export, eval).
    Raises `Unreadable` if orbax cannot read the step or what it read does not match
    the checksums saved with it (checkpoints saved without checksums are trusted).
    """
    items = {"params": ocp.args.StandardRestore(abstract_params),
             "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except  (anything: the files are bad)
      raise Unreadable(step, quiet.root_cause(e)) from e
    meta = restored["meta"]
    if not isinstance(meta, dict):
      raise Unreadable(step, "its meta item is not a JSON object")
    meta = dict(meta)
    checksums = meta.get("checksums")
    if checksums is not None:
      parts = {"meta": lambda: _meta_digest(meta),
               "params": lambda: fingerprint(restored["params"])}
      if abstract_opt_state is not None:
        parts["opt_state"] = lambda: fingerprint(restored["opt_state"])
      for name, compute in parts.items():
        if checksums.get(name) != compute():
          raise Unreadable(step, f"its {name} do not match the checksum saved with them")
    return restored["params"], restored.get("opt_state"), meta

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The `meta` item of `step` alone, its own checksum verified (`Unreadable` if not)."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
    except Exception as e:  # pylint: disable=broad-except  (anything: the files are bad)
      raise Unreadable(step, quiet.root_cause(e)) from e
    if not isinstance(meta, dict):
      raise Unreadable(step, "its meta item is not a JSON object")
    checksums = meta.get("checksums")
    if checksums is not None and checksums.get("meta") != _meta_digest(meta):
      raise Unreadable(step, "its meta do not match the checksum saved with them")
    return dict(meta)

  def params_reader(self, step: int, abstract_params: Any) -> "ParamsReader":
    """A `ParamsReader` of `step` (export): its leaves one at a time, verified at the end."""
    meta = self.restore_meta(step)
    return ParamsReader(epath.Path(self.directory) / str(step) / "params", step,
                        abstract_params, (meta.get("checksums") or {}).get("params"))

  def restore_newest_good(self, abstract_params: Any, abstract_opt_state: Any | None = None,
                          warn: Callable[[str], None] = print
                          ) -> tuple[int, Any, Any, dict[str, Any]] | None:
    """The newest step that restores and verifies, as (step, params, opt_state, meta).

    Each step skipped on the way is one `warn` line naming it and the reason. None
    when there is no checkpoint; `Unreadable` when there are some and none is good.
    """
    steps = sorted(self.all_steps(), reverse=True)
    reasons = []
    for step in steps:
      try:
        return (step, *self.restore(step, abstract_params, abstract_opt_state))
      except Unreadable as e:
        reasons.append(e)
        warn(f"warning: {e}; trying the previous checkpoint" if step != steps[-1]
             else f"warning: {e}")
    if not steps:
      return None
    raise Unreadable(steps[0], "no step is readable", message=(
        f"no checkpoint in {self.directory} is readable ("
        + "; ".join(f"step {e.step}: {e.reason}" for e in reasons)
        + "); move the checkpoints directory away to start afresh"))

  def restore_params(self, abstract_params: Any, step: int | None = None,
                     warn: Callable[[str], None] = print) -> tuple[int, Any]:
    """(step, params) of `step`, or of the newest step that verifies (eval, export)."""
    steps = self.all_steps()
    if not steps:
      raise ValueError(f"no checkpoint in {self.directory}")
    if step is None:
      step, params, _, _ = self.restore_newest_good(abstract_params, warn=warn)
      return step, params
    if step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {self.directory}; there are "
                       f"steps {sorted(steps)}")
    return step, self.restore(step, abstract_params)[0]

  def set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable `step` out of the way (to `checkpoints.unreadable/`), so
    the run can save that step again; nothing is deleted. Call on one process.
    (On an object store the move is a copy and a delete, object by object.)"""
    target = self.directory.parent / "checkpoints.unreadable" / f"{step}.{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    note = target.parent / "README.txt"
    if "://" in os.fspath(target) and not note.exists():
      # An object store has no empty folders, and epath renames only into one that
      # exists: this note makes it exist.
      note.write_text("Checkpoint steps that did not restore or verify, moved here by "
                      "`ul2 train` so that the run could save those steps again.\n")
    (self.directory / str(step)).rename(target)
    return target

  def reload(self) -> None:
    """Re-reads the steps on disk (after `set_aside`)."""
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class ParamsReader:
  """The parameters of one checkpoint step read a leaf, or a slice of a leaf, at a time
  (TensorStore, straight from orbax's files), so a reader holds one tensor, never the
  tree. Every read is folded into the parameters' fingerprint; `verify` reads what was
  not read yet and compares it with the checksum saved with the step, so a consumer
  (the streaming export) commits its output only after `verify` returns.

      reader = ckpt.params_reader(step, abstract_params)
      x = reader.read(("encoder", "layers", "mlp", "wo", "kernel"), index=3)  # layer 3
      reader.verify()  # Unreadable if the bits differ from the saved checksum

  `abstract_params` (the model's unboxed abstract tree) names the leaves, their order
  and their expected shapes and dtypes; a checkpoint of another structure is `Unreadable`.
  """

  def __init__(self, directory: epath.Path, step: int, abstract_params: Any,
               checksum: str | None):
    self.step = step
    self._directory = directory
    self._checksum = checksum
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    self._order = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    self._specs = {path: (tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)))
                   for path, (_, x) in zip(self._order, flat)}
    self._sums = {path: np.zeros(2, np.uint32) for path in self._order}
    self._read: dict[tuple[str, ...], set[int | None]] = {path: set() for path in self._order}
    self._arrays: dict[tuple[str, ...], Any] = {}
    self._context = None
    self._use_zarr3 = self._ocdbt = None  # From the item's _METADATA, at the first read.

  def _fail(self, reason: str) -> Unreadable:
    return Unreadable(self.step, reason)

  def _array(self, path: tuple[str, ...]) -> Any:
    if path in self._arrays:
      return self._arrays[path]
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    if path not in self._specs:
      raise KeyError(f"the model has no parameter {'/'.join(path)}")
    try:
      if self._use_zarr3 is None:
        metadata = json.loads((self._directory / "_METADATA").read_text())
        self._use_zarr3 = bool(metadata.get("use_zarr3", False))
        self._ocdbt = bool(metadata.get("use_ocdbt", True))
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
      info = ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=self._directory,
                                         use_zarr3=self._use_zarr3, ts_context=self._context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      array = ts.open(spec, open=True, read=True, context=self._context).result()
    except Exception as e:  # pylint: disable=broad-except  (missing or garbage files)
      raise self._fail(f"cannot open its parameter {'/'.join(path)} "
                       f"({quiet.root_cause(e)})") from e
    shape, dtype = self._specs[path]
    found = (tuple(int(d) for d in array.shape), str(np.dtype(array.dtype.numpy_dtype)))
    if found != (shape, dtype):
      raise self._fail(f"its parameter {'/'.join(path)} is {found[1]}{list(found[0])}, "
                       f"the model's is {dtype}{list(shape)}")
    self._arrays[path] = array
    return array

  def read(self, path: tuple[str, ...], index: int | None = None) -> np.ndarray:
    """Leaf `path` (`index`: only its slice `[index]`, e.g. one layer of a scanned stack)."""
    array = self._array(path)
    try:
      value = np.asarray((array if index is None else array[index]).read().result())
    except Exception as e:  # pylint: disable=broad-except  (a truncated or corrupt chunk)
      raise self._fail(f"cannot read its parameter {'/'.join(path)} "
                       f"({quiet.root_cause(e)})") from e
    done = self._read[path]  # Each element counts once, however often it is read.
    if index is None and None not in done:
      self._sums[path] = chunk_sums(value)
      done.clear()
      done.add(None)
    elif index is not None and None not in done and index not in done:
      offset = index * int(np.prod(self._specs[path][0][1:], dtype=np.int64))
      self._sums[path] = self._sums[path] + chunk_sums(value, offset)
      done.add(index)
    return value

  def _complete(self, path: tuple[str, ...]) -> bool:
    done, shape = self._read[path], self._specs[path][0]
    return None in done or (bool(shape) and len(done) == shape[0])

  def verify(self) -> None:
    """Reads the leaves (or slices) not read yet and checks the fingerprint of the whole
    against the checksum saved with the step; `Unreadable` if they differ. Checkpoints
    saved without checksums are trusted."""
    if self._checksum is None:
      return
    for path in self._order:
      if not self._complete(path):
        self._read[path].clear()
        self.read(path)
    sums = np.stack([self._sums[path] for path in self._order]) if self._order else (
        np.zeros((0, 2), np.uint32))
    specs = [self._specs[path] for path in self._order]
    if _digest(specs, sums) != self._checksum:
      raise self._fail("its params do not match the checksum saved with them")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings`: what restore should produce."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

