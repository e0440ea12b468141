"""Independent work split over devices and processes, JAX's way.

SPEAR's proposal blocks and SPEAR++'s restarts and roundings are
independent per row of their leading axis, so both are one computation
over a one-axis :class:`jax.sharding.Mesh`: ``shard_map`` gives every
device its share of the rows, the problem's arrays are replicated, and the
devices never communicate while they work. Only the small results (a few
directions per row) come back to the host, where every process runs the
same deterministic absorb and select on the same gathered rows.

Several processes (``jax.distributed.initialize``, one per host or per
GPU) join the same mesh: :func:`attack_devices` takes the first local
devices of every process, each process feeds the rows of its own devices
(:func:`run_sharded`) and :func:`to_host` gathers the rows of all of them
(``multihost_utils.process_allgather``, JAX's CPU collectives on CPU
hosts). The processes then hold identical results, and the driver's
stopping decisions are taken on process 0's clock (:func:`agree`), so
every process runs the same programs in the same order and ends with the
same answer. One process and one device is the plain ``jax.jit`` path.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

__all__ = [
  "agree",
  "attack_devices",
  "is_distributed",
  "lapack_safe",
  "map_rows",
  "run_sharded",
  "to_host",
]

_AXIS = "rows"


def is_distributed(devices: Sequence[jax.Device]) -> bool:
  """Whether ``devices`` span more than this process."""
  return any(d.process_index != jax.process_index() for d in devices)


def attack_devices(
  num_devices: int | None, *, across_processes: bool = True
) -> tuple[jax.Device, ...]:
  """The devices that share one attack's independent work.

  Args:
    num_devices: devices per process (``None``: all local ones).
    across_processes: with several JAX processes, use the first
      ``num_devices`` devices of every process (all processes must pass the
      same values); otherwise this process's only.

  Returns:
    The devices, grouped by process in process order.

  Raises:
    ValueError: if ``num_devices`` is not between 1 and the local count.
  """
  local = jax.local_devices()
  count = len(local) if num_devices is None else num_devices
  if not 1 <= count <= len(local):
    raise ValueError(
      f"num_devices={num_devices} but {len(local)} local devices."
    )
  if not across_processes or jax.process_count() == 1:
    return tuple(local[:count])
  by_process: dict[int, list[jax.Device]] = {}
  for device in sorted(jax.devices(), key=lambda d: d.id):
    by_process.setdefault(device.process_index, []).append(device)
  return tuple(d for p in sorted(by_process) for d in by_process[p][:count])


def lapack_safe(devices: tuple[jax.Device, ...]) -> tuple[jax.Device, ...]:
  """``devices`` for a computation that calls LAPACK (``eigh``, ``qr``).

  On CPU hosts whose cores are exposed as several devices, LAPACK calls
  running on two devices of one process at once can deadlock XLA's CPU
  runtime (measured here: a batched ``eigh`` under ``shard_map`` on two
  CPU devices never returns), so such stages keep one device per process
  there; LAPACK's own threads still use the cores. Accelerators are
  returned unchanged.
  """
  if devices[0].platform != "cpu":
    return devices
  first: dict[int, jax.Device] = {}
  for device in devices:
    first.setdefault(device.process_index, device)
  return tuple(first.values())


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
    x.dtype, jax.dtypes.prng_key
  )


def _global(x: Any, mesh: jax.sharding.Mesh, spec: jax.sharding.PartitionSpec):
  """This process's part of ``x`` as a global array on ``mesh``."""
  if spec == jax.sharding.PartitionSpec():
    local = np.asarray(x)
  else:
    mine = [
      i
      for i, d in enumerate(mesh.devices.flat)
      if d.process_index == jax.process_index()
    ]
    rows = x.shape[0] // mesh.devices.size
    local = np.asarray(x[mine[0] * rows : (mine[-1] + 1) * rows])
  return multihost_utils.host_local_array_to_global_array(local, mesh, spec)


@functools.cache
def _sharded(fn: Callable[..., Any], devices: tuple[jax.Device, ...]):
  """``jit(shard_map(fn))``: rows split over ``devices``, the rest shared."""
  if len(devices) == 1:
    return jax.jit(fn)
  mesh = jax.sharding.Mesh(np.array(devices), (_AXIS,))
  rows, shared = jax.sharding.PartitionSpec(_AXIS), jax.sharding.PartitionSpec()
  return jax.jit(
    jax.shard_map(fn, mesh=mesh, in_specs=(rows, shared), out_specs=rows)
  )


def run_sharded(
  fn: Callable[[tuple, tuple], Any],
  devices: tuple[jax.Device, ...],
  rows: tuple[Any, ...],
  shared: tuple[Any, ...],
) -> Any:
  """Dispatches ``fn(rows, shared)`` with the rows split over ``devices``.

  ``fn`` must treat the leading axis of every array in ``rows`` (and of
  every output) as independent rows; their count must be a multiple of
  ``len(devices)``. ``fn`` should be a module-level function or a cached
  ``functools.partial`` so that its compilation is reused. PRNG key arrays
  may be passed in ``rows``. Returns the outputs on the devices (a global
  array when the devices span processes); see :func:`to_host`.
  """
  call = _sharded(_unwrapping(fn, rows), devices)
  rows = tuple(jax.random.key_data(x) if _is_key(x) else x for x in rows)
  if is_distributed(devices):
    mesh = jax.sharding.Mesh(np.array(devices), (_AXIS,))
    rows = tuple(
      _global(x, mesh, jax.sharding.PartitionSpec(_AXIS)) for x in rows
    )
    shared = jax.tree.map(
      lambda x: _global(x, mesh, jax.sharding.PartitionSpec()), shared
    )
  return call(rows, shared)


@functools.cache
def _wrap_keys(fn: Callable[..., Any], is_key: tuple[bool, ...], impl: Any):
  def wrapped(rows, shared):
    rows = tuple(
      jax.random.wrap_key_data(x, impl=impl) if k else x
      for x, k in zip(rows, is_key, strict=True)
    )
    return fn(rows, shared)

  # Compile logs and profiles name the jitted function after this wrapper.
  inner = getattr(fn, "func", fn)  # a functools.partial names its function
  wrapped.__name__ = wrapped.__qualname__ = getattr(inner, "__name__", "fn")
  return wrapped


def _unwrapping(fn: Callable[..., Any], rows: tuple[Any, ...]):
  """``fn`` taking raw key data in place of the PRNG keys among ``rows``."""
  is_key = tuple(_is_key(x) for x in rows)
  if not any(is_key):
    return fn
  impl = jax.random.key_impl(rows[is_key.index(True)])
  return _wrap_keys(fn, is_key, impl)


def to_host(tree: Any) -> Any:
  """Numpy copies of device outputs, gathered from every process."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def _chunked_rows(rows, shared, *, fn, chunk):
  """``fn`` over ``chunk`` rows at a time (``lax.map``): bounded memory."""
  size = rows[0].shape[0]
  split = tuple(x.reshape(size // chunk, chunk, *x.shape[1:]) for x in rows)
  out = jax.lax.map(lambda r: fn(r, shared), split)
  return jax.tree.map(lambda x: x.reshape(size, *x.shape[2:]), out)


@functools.cache
def _chunked(fn: Callable[..., Any], chunk: int):
  return functools.partial(_chunked_rows, fn=fn, chunk=chunk)


def map_rows(
  fn: Callable[[tuple, tuple], Any],
  devices: tuple[jax.Device, ...],
  rows: tuple[Any, ...],
  shared: tuple[Any, ...],
  *,
  chunk: int | None = None,
) -> Any:
  """:func:`run_sharded` for any row count, gathered to the host.

  The rows are padded by repeating the last one, and the padding is
  dropped from the outputs, so every row's result is the same on any number
  of devices. With ``chunk``, each device runs ``fn`` on at most ``chunk``
  rows at a time (a ``lax.map`` over its share), which bounds the memory of
  a batched ``fn`` whose per-row work is large.
  """
  count = rows[0].shape[0]
  per_device = -(-count // len(devices))
  chunk = per_device if chunk is None else max(1, min(chunk, per_device))
  per_device = -(-per_device // chunk) * chunk
  pad = per_device * len(devices) - count
  if pad:
    rows = tuple(
      jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) for x in rows
    )
  if chunk < per_device:
    fn = _chunked(fn, chunk)
  out = to_host(run_sharded(fn, devices, rows, shared))
  return jax.tree.map(lambda x: x[:count], out)


def agree(value: Any, devices: tuple[jax.Device, ...]) -> Any:
  """Process 0's ``value`` on every process (itself when not distributed).

  Decisions that depend on a process's own clock (time budgets) go
  through here so that all processes stop at the same step.
  """
  if not is_distributed(devices):
    return value
  return multihost_utils.broadcast_one_to_all(np.asarray(value)).item()
