"""A measured privacy audit: does a deployment's client update leak?

:func:`run_audit` runs SPEAR, SPEAR++ and the gradient-matching baseline
over a grid around a deployment (batch size, width, DP-SGD noise, FedAvg
local steps) and writes ``report.md``, ``report.json`` and plots;
``scripts/audit.py`` is its command line.
"""

from spear_jax._audit import AXES as AXES
from spear_jax._audit import AuditConfig as AuditConfig
from spear_jax._audit import audit_cells as audit_cells
from spear_jax._audit import run_audit as run_audit
from spear_jax._audit import spear_success_estimate as spear_success_estimate
from spear_jax._audit import wilson_interval as wilson_interval
from spear_jax._audit import write_report as write_report

__all__ = [
  "AXES",
  "AuditConfig",
  "audit_cells",
  "run_audit",
  "spear_success_estimate",
  "wilson_interval",
  "write_report",
]
