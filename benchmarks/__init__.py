"""Benchmarks: routing comparison of pixiu-kv against baselines and peer routers.

``python -m benchmarks --help`` (or ``pixiu-kv bench``) runs them; see docs/benchmarks.md.
"""

from .metrics import Sample, aggregate, percentile
from .workloads import WORKLOAD_NAMES, Session, Turn, Workload, WorkloadSpec, build_workload, default_spec

__all__ = [
    "WORKLOAD_NAMES",
    "Sample",
    "Session",
    "Turn",
    "Workload",
    "WorkloadSpec",
    "aggregate",
    "build_workload",
    "default_spec",
    "percentile",
]
