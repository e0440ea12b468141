"""Test-wide JAX settings: float64, loud shape/dtype promotion, 2 devices.

Two host CPU devices make every ``invert`` call in the suite run the
sharded (multi-device) sampler, as the scripts do on multi-core hosts.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Scripts started by the tests share one compilation cache outside $HOME.
os.environ.setdefault(
  "SPEAR_JAX_COMPILATION_CACHE",
  os.path.join(tempfile.gettempdir(), "spear_jax_test_compilation_cache"),
)
