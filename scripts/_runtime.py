"""Process set-up shared by the scripts; import it before ``jax``.

* Every CPU core is a JAX device. XLA runs one computation on one CPU
  device mostly single-threaded; with
  ``--xla_force_host_platform_device_count=N`` the host shows ``N`` CPU
  devices and ``spear_jax.invert`` splits each block of proposals across
  them (``AttackConfig.num_devices``). An ``XLA_FLAGS`` that already sets
  the count is left alone; on GPU hosts the default backend is still the
  GPU.
* JAX's persistent compilation cache is on by default
  (``--compilation_cache_dir``, default ``$SPEAR_JAX_COMPILATION_CACHE`` or
  ``~/.cache/spear_jax/jax``; an empty value turns it off), so a second run
  of a script loads its compiled programs instead of compiling them again.
"""

import os
import sys

from absl import flags

_FLAG = "--xla_force_host_platform_device_count"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {_FLAG}={os.cpu_count() or 1}"
  ).strip()

_CACHE_DIR = flags.DEFINE_string(
  "compilation_cache_dir",
  os.environ.get(
    "SPEAR_JAX_COMPILATION_CACHE",
    os.path.join("~", ".cache", "spear_jax", "jax"),
  ),
  "JAX persistent compilation cache (empty: off). A warm cache skips "
  "most of the compilation of a new process.",
)


def fail(prog: str, message: str):
  """Bad input: ``PROG: error: MESSAGE`` on one stderr line, exit code 2."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def flags_parser(prog: str):
  """An ``app.run`` flags parser that reports a bad flag with :func:`fail`."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as err:
      fail(prog, str(err).splitlines()[0])

  return parse


def configure_jax(*, x64: bool) -> None:
  """Sets the dtype mode and the persistent compilation cache."""
  import jax

  jax.config.update("jax_enable_x64", x64)
  if _CACHE_DIR.value:
    path = os.path.expanduser(_CACHE_DIR.value)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: most of ours compile in well under a second,
    # but a cold process compiles dozens of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
