"""Routing policies on simulated engines in virtual time (benchmarks.virtual_fleet).

The figures asserted here are outputs of a simulation in virtual time (seeded workload and
scheduling), not measurements of this machine. A command-line run repeats exactly; in one
process, runs after other runs can differ a little (trio wakes tasks with equal deadlines in
an order that follows object addresses), so the margins asserted are wide.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.sizing import FleetPlan, plan_fleet
from benchmarks.virtual_fleet import POLICIES, Outcome, run_policy
from benchmarks.workloads import Workload, WorkloadSpec, build_workload

# A saturated shared-prefix fleet, small enough for a test: 16 groups x 8 prompts sharing a
# 1024-token system prompt, 48 clients at once, caches 1.5x the distinct prefixes.
_SPEC = WorkloadSpec("shared-prefix", groups=16, per_group=8, system_tokens=1024, question_tokens=64,
                     output_tokens=64, api="completion")


def _setup(seed: int = 0) -> tuple[Workload, FleetPlan]:
    return (build_workload(_SPEC, seed=seed),
            plan_fleet(_SPEC, engines=4, cache_fraction=1.5, speed=1.0, min_requests_per_engine=2))


def _closed(policy: str, seed: int = 0, **overrides: object) -> Outcome:
    workload, plan = _setup(seed)
    return run_policy(policy, workload, plan, mode="closed", concurrency=48, rate=1.0,
                      duration=float("inf"), seed=seed, overrides=dict(overrides))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_serves_every_request(policy: str) -> None:
    out = _closed(policy)
    assert out.requests == _SPEC.groups * _SPEC.per_group
    assert sum(out.per_engine) == out.requests
    assert 0.0 <= out.hit_ratio < 1.0
    assert 0.0 < out.ttft_p50 <= out.ttft_p90 <= out.ttft_p99
    assert out.throughput_rps > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_kv_aware_routing_keeps_a_saturated_fleet_hitting(seed: int) -> None:
    # By the predicted TTFT alone, small queue differences spread each group over every
    # engine (each copy holding the prefix's KV blocks through its decode). The admission
    # wait of a full KV cache (engine_kv_tokens, set by the benchmark target) and
    # bounded-load affinity each keep groups on their holders; together they hit at least
    # as well as the full-knowledge oracle that places by TTFT.
    default = _closed("pixiu-kv", seed)
    kv_only = _closed("pixiu-kv", seed, affinity_load_factor=0)
    cost_alone = _closed("pixiu-kv", seed, affinity_load_factor=0, engine_kv_tokens=0)
    oracle = _closed("oracle", seed)
    round_robin = _closed("round-robin", seed)
    # (measured: default 0.73-0.75, the KV term alone 0.44-0.54, the cost alone 0.37-0.42)
    assert kv_only.hit_ratio > cost_alone.hit_ratio
    assert default.hit_ratio > 1.5 * cost_alone.hit_ratio
    assert default.hit_ratio >= 0.95 * oracle.hit_ratio
    assert default.throughput_rps > round_robin.throughput_rps
    on_cache = default.reasons.get("cache", 0) + default.reasons.get("affinity", 0)
    assert on_cache > cost_alone.reasons["cache"]
    assert "affinity" not in cost_alone.reasons
    assert max(default.per_engine) <= 1.25 * (default.requests / 4)  # still spread


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.virtual_fleet", *args],
                          capture_output=True, text=True, timeout=300)


def test_the_command_line_prints_one_line_per_policy_and_repeats_exactly() -> None:
    args = ("--quick", "--concurrency", "8", "--policies", "round-robin,pixiu-kv", "--jobs", "2",
            "--set", "affinity_load_factor=1.5")
    first, second = _command(*args), _command(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert lines[0].startswith("# shared-prefix seed=0") and "'affinity_load_factor': 1.5" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["round-robin", "pixiu-kv"]
    assert all(" n=   48 " in line for line in lines[1:])
    # Each run in a fresh process: the same command gives the same figures.
    assert second.stdout == first.stdout


def test_the_command_line_refuses_an_unknown_policy() -> None:
    proc = _command("--quick", "--policies", "round-robin,random")
    assert proc.returncode == 2
    assert "unknown policies random" in proc.stderr


def test_an_unknown_policy_is_refused() -> None:
    workload, plan = _setup()
    with pytest.raises(ValueError, match="unknown policy 'random'"):
        run_policy("random", workload, plan, mode="closed", concurrency=4, rate=1.0, duration=1.0)
