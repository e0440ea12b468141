"""Exposes every CPU core as a JAX device; import before ``jax``.

XLA runs one computation on one CPU device mostly single-threaded. With
``--xla_force_host_platform_device_count=N`` the host shows ``N`` CPU
devices and ``spear_jax.invert`` splits each block of proposals across them
(``AttackConfig.num_devices``). An ``XLA_FLAGS`` that already sets the count
is left alone; on GPU hosts the default backend is still the GPU.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {_FLAG}={os.cpu_count() or 1}"
  ).strip()
