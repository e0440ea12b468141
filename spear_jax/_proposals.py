"""SPEAR's proposal sampler and sparsity filter.

One proposal samples ``b - 1`` alive rows ``A``, takes the unit direction
``q`` spanning ``ker(L_A)`` and counts the zeros of ``L q`` over alive rows.
If the ``b - 1`` rows all lie in the zero set of column ``i`` of ``D``, then
``q`` is column ``i`` of ``Q`` up to scale and ``L q`` is about half zeros;
otherwise ``L q`` has only the ``b - 1`` forced zeros (plus the rows where all
mixed columns vanish). :func:`propose_direction` handles one proposal;
:func:`propose_block` applies it to a block with one ``vmap``.
"""

import functools

import jax
import jax.numpy as jnp

from spear_jax._linalg import null_vector
from spear_jax._sampling import sample_rows
from spear_jax._types import Array, Bool, Float, Int, PRNGKeyArray

_HI = jax.lax.Precision.HIGHEST

__all__ = ["propose_block", "propose_direction"]


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
  batched = jax.vmap(propose_direction, in_axes=(0, None, None, None, None,
                                                 None))

  def one_chunk(chunk_keys):
    return batched(chunk_keys, l_mxb, alive_rows_m, alive_m, num_alive,
                   screen_tol)

  directions, zeros = jax.lax.map(one_chunk, keys)
  b = l_mxb.shape[1]
  return directions.reshape(block_size, b), zeros.reshape(block_size)
