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
* Several processes (hosts, or one process per GPU): every script takes
  ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``,
  the arguments of ``jax.distributed.initialize``, which it calls (with
  JAX's gloo collectives for CPU hosts). The same command started as
  ``N`` processes then splits every attack's proposals and restarts over
  all of their devices; process 0 writes the outputs (:func:`is_writer`)
  and every process ends with the same exit code.
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


_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0, to run as several processes "
  "(jax.distributed.initialize).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "How many processes (with --coordinator_address)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index, 0 to --num_processes - 1."
)
_PROG = ["spear_jax"]


def fail(prog: str, message: str):
  """Bad input: ``PROG: error: MESSAGE`` on one stderr line, exit code 2."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def flags_parser(prog: str):
  """An ``app.run`` flags parser that reports a bad flag with :func:`fail`."""

  _PROG[0] = prog

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as err:
      fail(prog, str(err).splitlines()[0])

  return parse


def _initialize_distributed(jax) -> None:
  """``jax.distributed.initialize`` from the three flags (all or none)."""
  given = [
    f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
  ]
  if not any(given):
    return
  if not all(given):
    fail(
      _PROG[0],
      "--coordinator_address, --num_processes and --process_id go together.",
    )
  count, index = _NUM_PROCESSES.value, _PROCESS_ID.value
  if count < 1 or not 0 <= index < count:
    fail(
      _PROG[0],
      f"--process_id={index} must lie in [0, --num_processes={count}).",
    )
  host, _, port = _COORDINATOR.value.rpartition(":")
  if not host or not port.isdigit():
    fail(
      _PROG[0],
      f"--coordinator_address={_COORDINATOR.value!r} is not HOST:PORT.",
    )
  # CPU hosts exchange results through gloo; accelerators use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    _COORDINATOR.value, num_processes=count, process_id=index
  )


def is_writer() -> bool:
  """Whether this process writes the outputs (process 0, or the only one)."""
  import jax

  return jax.process_index() == 0


def process_share() -> tuple[int, int]:
  """``(index, count)`` of this process among the script's processes."""
  import jax

  return jax.process_index(), jax.process_count()


def configure_jax(*, x64: bool) -> None:
  """Sets the dtype mode and the persistent compilation cache, and joins
  the other processes when ``--coordinator_address`` is given."""
  import jax

  _initialize_distributed(jax)
  jax.config.update("jax_enable_x64", x64)
  if _CACHE_DIR.value:
    path = os.path.expanduser(_CACHE_DIR.value)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: most of ours compile in well under a second,
    # but a cold process compiles dozens of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _broadcast_bytes(data: bytes) -> bytes:
  """Process 0's ``data`` on every process (JAX's collectives)."""
  from jax.experimental import multihost_utils
  import numpy as np

  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buffer = np.zeros((size,), np.uint8)
  if is_writer():
    buffer[:] = np.frombuffer(data, np.uint8)
  return bytes(multihost_utils.broadcast_one_to_all(buffer))


def gather_strings(text: str) -> list[str]:
  """Every process's ``text``, in process order, on every process."""
  from jax.experimental import multihost_utils
  import numpy as np

  data = np.frombuffer(text.encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int64(data.size))
  buffer = np.zeros((int(np.max(sizes)),), np.uint8)
  buffer[: data.size] = data
  rows = multihost_utils.process_allgather(buffer)
  return [bytes(row[:size]).decode() for row, size in zip(rows, sizes)]


def _writer_bytes(path: str) -> bytes:
  """The bytes of process 0's file at ``path`` (empty if it has none)."""
  data = b""
  if is_writer() and os.path.exists(path):
    with open(path, "rb") as f:
      data = f.read()
  return _broadcast_bytes(data) if process_share()[1] > 1 else data


def output_dir(out_dir: str, shared: tuple[str, ...] = ()) -> str:
  """Where this process writes: ``out_dir`` on process 0; elsewhere a
  scratch folder holding process 0's copies of the ``shared`` files (its
  resume logs), so that every process resumes the same way without a
  shared file system.
  """
  import tempfile

  if process_share()[1] == 1:
    return out_dir
  local = out_dir if is_writer() else tempfile.mkdtemp(prefix="spear_jax_")
  for name in shared:
    data = _writer_bytes(os.path.join(out_dir, name))
    if not is_writer() and data:
      with open(os.path.join(local, name), "wb") as f:
        f.write(data)
  return local


def trial_dir(out_dir: str, *, resume: bool, log: str = "trials.jsonl") -> str:
  """The folder a trial-logging script writes to, ready for its trials.

  Process 0 creates ``out_dir`` (a one-line error, exit 2, if it cannot)
  and, without ``resume``, removes the old ``log``; then every process
  gets its :func:`output_dir`, with process 0's ``log`` to resume from.
  """
  if is_writer():
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
      fail(_PROG[0], f"cannot create --out_dir {out_dir}: {err.strerror}.")
    path = os.path.join(out_dir, log)
    if not resume and os.path.exists(path):
      os.remove(path)
  # Other processes write to a scratch copy (process 0 writes the outputs).
  return output_dir(out_dir, (log,))


def shared_copy(path: str) -> str:
  """``path`` on process 0; elsewhere a scratch copy of process 0's file."""
  directory = output_dir(
    os.path.dirname(path) or ".", (os.path.basename(path),)
  )
  return os.path.join(directory, os.path.basename(path))


def exit_all(code: int) -> None:
  """``sys.exit`` with process 0's code on every process."""
  if process_share()[1] > 1:
    from jax.experimental import multihost_utils
    import numpy as np

    code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
  sys.exit(code)
