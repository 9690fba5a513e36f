"""The load generator against a real in-process simulated engine (no subprocesses)."""

from __future__ import annotations

import io

import attrs

from benchmarks.runner import LoadSettings, Progress, run_load
from benchmarks.workloads import build_workload, default_spec
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.fleet import open_fleet


async def test_closed_loop_multi_turn_feeds_real_answers_back() -> None:
    spec = attrs.evolve(default_spec("multi-turn", quick=True), per_group=3, rounds=3)
    workload = build_workload(spec, seed=2)
    config = EngineConfig(speed=50.0, gpu_kv_tokens=16384, max_model_len=4096, cpu_tier_tokens=0)
    async with open_fleet(1, config, controller=False) as fleet:
        progress_out = io.StringIO()
        result = await run_load(
            fleet.engines[0].url, workload,
            LoadSettings(mode="closed", concurrency=2, duration_s=60, model=config.model),
            default_endpoint="engine-0", progress=Progress(workload.request_count, "t", progress_out))
    samples = result.samples
    assert len(samples) == 9 and all(s.ok for s in samples)
    assert result.not_started == 0
    assert "9/9" in progress_out.getvalue()
    for session in workload.sessions:
        turns = sorted((s for s in samples if s.session_id == session.session_id), key=lambda s: s.turn)
        assert [s.turn for s in turns] == [0, 1, 2]
        # Each round's prompt holds the previous one plus its answer and the new question,
        # and the engine finds that earlier conversation in its prefix cache.
        assert turns[0].prompt_tokens < turns[1].prompt_tokens < turns[2].prompt_tokens
        assert turns[1].prompt_tokens - turns[0].prompt_tokens > turns[0].completion_tokens
        assert turns[2].cached_tokens > 0 and turns[1].cached_tokens > 0
    for s in samples:
        assert s.usage_seen and s.completion_tokens == spec.output_tokens
        assert s.endpoint == "engine-0"
        ttft = s.ttft_s
        assert ttft is not None and 0 <= ttft <= s.e2e_s
        assert len(s.itl_s) == spec.output_tokens - 1


async def test_open_loop_records_http_errors_without_stopping() -> None:
    workload = build_workload(default_spec("no-reuse", quick=True), seed=1)
    workload = attrs.evolve(workload, sessions=workload.sessions[:4])
    config = EngineConfig(speed=50.0, gpu_kv_tokens=8192, max_model_len=4096, cpu_tier_tokens=0)
    async with open_fleet(1, config, controller=False) as fleet:
        result = await run_load(fleet.engines[0].url, workload,
                                LoadSettings(mode="open", rate=200.0, duration_s=30, model="no-such-model"))
    assert len(result.samples) == 4
    assert all(not s.ok and s.status == 404 for s in result.samples)
    assert all("does not exist" in s.error for s in result.samples)
