"""SPEAR's proposal sampler and sparsity filter.

One proposal samples ``b - 1`` alive rows ``A``, takes the unit direction
``q`` spanning ``ker(L_A)`` and counts the zeros of ``L q`` over alive rows.
If the ``b - 1`` rows all lie in the zero set of column ``i`` of ``D``, then
``q`` is column ``i`` of ``Q`` up to scale and ``L q`` is about half zeros;
otherwise ``L q`` has only the ``b - 1`` forced zeros (plus the rows where all
mixed columns vanish). :func:`propose_direction` handles one proposal;
:func:`propose_block` applies it to a block with one ``vmap``;
:func:`spear_sampler` is the SPEAR strategy that runs jitted blocks of them
(split over the local devices) for :func:`spear_jax.invert`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spear_jax._config import AttackConfig
from spear_jax._distributed import attack_devices
from spear_jax._distributed import lapack_safe
from spear_jax._distributed import run_sharded
from spear_jax._distributed import to_host
from spear_jax._linalg import BLOCKED_QR_FROM
from spear_jax._linalg import null_vector
from spear_jax._sampling import sample_rows
from spear_jax._strategy import StepOutput
from spear_jax._strategy import Strategy
from spear_jax._types import Array
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int
from spear_jax._types import PRNGKeyArray

_HI = jax.lax.Precision.HIGHEST

__all__ = [
  "SamplerState",
  "propose_block",
  "propose_direction",
  "spear_sampler",
]


def propose_direction(
  key: PRNGKeyArray,
  l_mxb: Float[Array, "m b"],
  alive_rows_m: Int[Array, " m"],
  alive_m: Bool[Array, " m"],
  num_alive: Int[Array, ""],
  screen_tol: Float[Array, ""],
) -> tuple[Float[Array, " b"], Int[Array, ""]]:
  r"""One proposal direction and its sparsity.

  .. math:: q \in \ker(L_A),\ \|q\| = 1, \qquad
     s(q) = \#\{j \text{ alive} : |(L q)_j| \le \text{screen\_tol}\}

  Since ``L`` has orthonormal columns, ``||L q|| = 1`` and the tolerance is
  absolute on a unit vector.

  Args:
    key: PRNG key of this proposal.
    l_mxb: the left factor ``L`` of the weight gradient.
    alive_rows_m: indices of alive rows, padded to length ``m``.
    alive_m: mask of alive rows.
    num_alive: number of alive rows ``M``.
    screen_tol: zero tolerance.

  Returns:
    ``(q, zeros)``.
  """
  b = l_mxb.shape[1]
  rows_k = sample_rows(key, alive_rows_m, num_alive, b - 1)
  q_b = null_vector(l_mxb[rows_k])
  v_m = jnp.dot(l_mxb, q_b, precision=_HI)
  zeros = jnp.sum((jnp.abs(v_m) <= screen_tol) & alive_m)
  return q_b, zeros


@functools.partial(jax.jit, static_argnames=("block_size", "chunk_size"))
def propose_block(
  key: PRNGKeyArray,
  l_mxb: Float[Array, "m b"],
  alive_rows_m: Int[Array, " m"],
  alive_m: Bool[Array, " m"],
  num_alive: Int[Array, ""],
  screen_tol: Float[Array, ""],
  *,
  block_size: int,
  chunk_size: int,
) -> tuple[Float[Array, "N b"], Int[Array, " N"]]:
  """``block_size`` proposals: ``vmap`` over chunks, ``lax.map`` over chunks.

  Chunks of ``chunk_size`` proposals keep the Householder eliminations in
  cache on CPUs; on accelerators a large ``chunk_size`` is better.

  Args:
    key: PRNG key of the block; split once into one key per proposal.
    l_mxb: the left factor ``L``.
    alive_rows_m: indices of alive rows, padded to length ``m``.
    alive_m: mask of alive rows.
    num_alive: number of alive rows ``M``.
    screen_tol: zero tolerance.
    block_size: proposals in the block (a multiple of ``chunk_size``).
    chunk_size: proposals per ``vmap``.

  Returns:
    ``(directions, zeros)`` of every proposal of the block.
  """
  keys = jax.random.split(key, block_size)
  keys = keys.reshape(block_size // chunk_size, chunk_size)
  batched = jax.vmap(
    propose_direction, in_axes=(0, None, None, None, None, None)
  )

  def one_chunk(chunk_keys):
    return batched(
      chunk_keys, l_mxb, alive_rows_m, alive_m, num_alive, screen_tol
    )

  directions, zeros = jax.lax.map(one_chunk, keys)
  b = l_mxb.shape[1]
  return directions.reshape(block_size, b), zeros.reshape(block_size)


def _devices(config: AttackConfig) -> tuple[jax.Device, ...]:
  """Devices that share a block: all local ones (of every process, see
  ``config.across_processes``), unless the config says fewer; as many per
  process as give every device a whole number of chunks."""
  chunk = min(config.chunk_size, config.block_size)
  per_process = config.num_devices or len(jax.local_devices())
  while True:
    devices = attack_devices(
      per_process, across_processes=config.across_processes
    )
    if not config.block_size % (len(devices) * chunk):
      return devices
    if per_process == 1:
      raise ValueError(
        f"block_size={config.block_size} is not a multiple of "
        f"{len(devices)} processes x chunk_size={chunk}."
      )
    per_process -= 1


def _screen_local(
  rows, shared, *, num_devices, block_size, chunk_size, local_max_out
):
  """One device's share of a block, compacted to its passers."""
  (keys,) = rows
  l_mxb, alive_rows_m, alive_m, num_alive, tol, floor = shared
  directions, zeros = propose_block(
    keys[0],
    l_mxb,
    alive_rows_m,
    alive_m,
    num_alive,
    tol,
    block_size=block_size // num_devices,
    chunk_size=chunk_size,
  )
  passed = zeros >= floor
  (index,) = jnp.nonzero(passed, size=local_max_out, fill_value=0)
  valid = jnp.arange(local_max_out) < jnp.sum(passed)
  return directions[index], valid


@functools.cache
def _screen_block_fn(devices, block_size, chunk_size, max_out):
  """Block of proposals, compacted to (a random subset of) passers.

  Returns ``screen(keys, args) -> (directions, valid)`` (one key per
  device) where the rows flagged ``valid`` are the filter-passing
  proposals. With several devices (several GPUs, the cores of a CPU host
  with ``--xla_force_host_platform_device_count``, or the devices of
  several processes) the block is split evenly across them
  (:func:`spear_jax._distributed.run_sharded`); each device samples and
  compacts its own share, so the devices never communicate while they work.
  The result stays on the devices until :func:`to_host` (so the next block
  can be dispatched first).
  """
  local = functools.partial(
    _screen_local,
    num_devices=len(devices),
    block_size=block_size,
    chunk_size=chunk_size,
    local_max_out=max_out // len(devices),
  )

  def screen(keys, args):
    return run_sharded(local, devices, (keys,), args)

  return screen


class SamplerState(NamedTuple):
  """SPEAR sampler state.

  Attributes:
    key: the PRNG key of the next block.
    pending: the block already in flight (its directions and valid flags).
    args: the problem's device arrays that every block reads.
  """

  key: PRNGKeyArray
  pending: tuple[jax.Array, jax.Array] | None
  args: tuple[jax.Array, ...]


def spear_sampler(config: AttackConfig | None = None) -> Strategy:
  """SPEAR's strategy: blocks of sampled submatrices, screened on device.

  Each step returns the filter-passing proposals of one block of
  ``config.block_size`` proposals (split over the local devices) and
  dispatches the next block first, so that one block is always in flight
  while the host absorbs the previous one.

  Args:
    config: the attack's settings (block and chunk sizes, devices).

  Returns:
    A :class:`Strategy`.
  """
  config = AttackConfig() if config is None else config
  devices = _devices(config)
  block_size = config.block_size

  def dispatch(key, args):
    # From b = 33 on the null vectors are LAPACK QRs: one CPU device per
    # process (see spear_jax._distributed.lapack_safe).
    b = args[0].shape[1]
    devs = lapack_safe(devices) if b >= BLOCKED_QR_FROM else devices
    screen = _screen_block_fn(
      devs,
      block_size,
      min(config.chunk_size, block_size),
      max(1, min(config.max_candidates_per_block, block_size)),
    )
    key, block_key = jax.random.split(key)
    return key, screen(jax.random.split(block_key, len(devs)), args)

  def init(key, problem):
    # The block's device arguments are built once per run, not per block.
    args = (
      problem.l_mxb,
      problem.alive_rows,
      problem.alive,
      jnp.asarray(problem.num_alive),
      problem.scalar(problem.tol.screen),
      jnp.asarray(problem.floor),
    )
    return SamplerState(key, None, args)

  def step(state, problem, pool, selection):
    del problem, pool, selection
    key, pending, args = state
    if pending is None:
      key, pending = dispatch(key, args)
    finished = pending
    key, pending = dispatch(key, args)  # in flight while the host works
    directions, valid = to_host(finished)
    return StepOutput(
      directions[valid],
      SamplerState(key, pending, args),
      proposals=block_size,
      blocks=1,
      stage="block",
    )

  return Strategy("SPEAR", init, step)
