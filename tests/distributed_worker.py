"""One process of the multi-device and multi-process tests.

``python distributed_worker.py OUT DEVICES METHODS [COORDINATOR
NUM_PROCESSES ID]`` runs the comma-separated METHODS (SPEAR++, SPEAR) on
fixed synthetic problems, once per ``AttackConfig.num_devices`` in
1, 2, 4 that the process has, with ``DEVICES`` CPU
devices per process, optionally as process ``ID`` of ``NUM_PROCESSES``
joined through ``jax.distributed`` on ``COORDINATOR`` (JAX's gloo CPU
collectives), and saves what it recovered to ``OUT`` (one file per
process). The test compares the files.
"""

import os
import sys

out_path, devices, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
if len(sys.argv) > 4:
  coordinator, num_processes, process_id = sys.argv[4:7]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator, num_processes=int(num_processes), process_id=int(process_id)
  )

sys.path.insert(0, os.path.dirname(__file__))
import helpers

import spear_jax

arrays = {}
for method, (seed, m, n, b) in (
  ("spearpp", (7, 160, 80, 14)),
  ("spear", (8, 90, 50, 7)),
):
  if method not in methods.split(","):
    continue
  p = helpers.relu_layer_problem(seed, m, n, b)
  for count in (c for c in (1, 2, 4) if c <= devices):
    config = spear_jax.AttackConfig(block_size=2048, num_devices=count)
    result = spear_jax.invert(
      p["weight_grad"],
      p["bias_grad"],
      key=jax.random.key(3),
      method=method,
      weight=p["weight"],
      bias=p["bias"],
      config=config,
    )
    inputs = np.asarray(result.inputs)
    order = helpers.match_rows(inputs, p["inputs"])
    name = f"{method}_{count}"
    arrays[f"{name}_inputs"] = inputs
    arrays[f"{name}_error"] = np.max(np.abs(inputs - p["inputs"][order]))
    arrays[f"{name}_success"] = result.success
    arrays[f"{name}_rounds"] = result.stats.blocks
    arrays[f"{name}_proposals"] = result.stats.proposals
    arrays[f"{name}_devices"] = len(spear_jax.attack.attack_devices(count))
np.savez(out_path, **arrays)
