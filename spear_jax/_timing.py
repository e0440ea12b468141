"""Where an inversion's time and memory go: a per-phase clock.

:class:`PhaseClock` books the wall time of each named phase of the driver
(``prepare``, a strategy's stages, ``absorb``, ``select``, ``finalize``),
the part of it JAX spent compiling (tracing, lowering, XLA compilation and
persistent-cache reads, from :mod:`jax.monitoring`), and how much the
process's resident-memory high-water mark rose during it (``VmHWM`` of
``/proc/self/status``; zero where that file does not exist). The result is
``InversionStats.timings``, one :class:`~spear_jax._types.PhaseTime` per
phase, which ``scripts/benchmark.py --mode=profile`` reports.
"""

from collections.abc import Iterator
import contextlib
import time

import jax

from spear_jax._types import PhaseTime

__all__ = ["PhaseClock", "compile_seconds", "rss_high_water"]

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
  "/jax/compilation_cache/cache_retrieval_time_sec",
)
_compile_total = [0.0]


def _on_duration(event: str, duration_secs: float, **kwargs: str | int) -> None:
  del kwargs
  if event in _COMPILE_EVENTS:
    _compile_total[0] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
  """Seconds this process has spent compiling JAX programs so far."""
  return _compile_total[0]


def rss_high_water() -> int:
  """The process's peak resident memory so far in bytes (0 if unknown)."""
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


class PhaseClock:
  """Accumulates time, compile time and memory growth per named phase."""

  def __init__(self) -> None:
    self._phases: dict[str, list[float]] = {}
    self._high_water = rss_high_water()

  @contextlib.contextmanager
  def __call__(self, name: str = "step") -> Iterator[list[str]]:
    """Times the block under ``name``; it yields ``[name]``, which the
    block may change (a strategy's step names its stage when it returns).
    """
    label = [name]
    start, compiled = time.perf_counter(), compile_seconds()
    try:
      yield label
    finally:
      high_water = rss_high_water()
      entry = self._phases.setdefault(label[0], [0.0, 0.0, 0, 0])
      entry[0] += time.perf_counter() - start
      entry[1] += compile_seconds() - compiled
      entry[2] += 1
      entry[3] += max(0, high_water - self._high_water)
      self._high_water = max(self._high_water, high_water)

  def summary(self) -> tuple[PhaseTime, ...]:
    """One :class:`PhaseTime` per phase, in the order they first ran."""
    return tuple(
      PhaseTime(name, seconds, compiled, int(calls), int(rise))
      for name, (seconds, compiled, calls, rise) in self._phases.items()
    )
