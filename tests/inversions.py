"""How the tests invert a synthetic layer (see ``helpers``), certified.

Kept apart from ``helpers``, which builds problems without the code under
test.
"""

import jax

import spear_jax


def invert_layer(p, rng, method, batch_size=None, config=None):
  """Inverts a layer problem ``p`` with its weights and a key from ``rng``."""
  return spear_jax.invert(
    p["weight_grad"],
    p["bias_grad"],
    key=jax.random.key(int(rng.integers(1 << 30))),
    method=method,
    batch_size=batch_size,
    weight=p["weight"],
    bias=p["bias"],
    config=config,
  )
