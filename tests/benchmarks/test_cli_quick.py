"""A tiny end-to-end ``--quick`` run: every output file exists with sane fields.

Structure only: never timings (the machine is shared).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.__main__ import main


def test_quick_run_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["--quick", "--out", str(out), "--workloads", "shared-prefix,multi-turn",
                 "--targets", "round-robin,pixiu-kv,oracle,external", "--max-sessions", "5",
                 "--duration", "20"])
    assert code == 0

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"runs"}
    runs = results["runs"]
    assert {(r["workload"], r["target"]) for r in runs} == {
        (w, t) for w in ("shared-prefix", "multi-turn") for t in ("round-robin", "pixiu-kv", "oracle")}
    for run in runs:
        m = run["metrics"]
        for key in ("hit_ratio", "ttft_p50_s", "ttft_p90_s", "ttft_p95_s", "ttft_p99_s", "e2e_p50_s",
                    "e2e_p99_s", "itl_p50_s", "throughput_rps", "output_tps", "load_cv", "errors",
                    "requests", "routed", "fallback", "per_engine", "gateway_cpu_ms_per_req",
                    "gateway_peak_rss_mb"):
            assert key in m, key
        assert m["errors"] == 0
        assert m["requests"] == (5 if run["workload"] == "shared-prefix" else 20)
        assert m["prompt_tokens"] > 0 and m["output_tokens"] > 0
        assert m["ttft_p50_s"] is not None and m["ttft_p50_s"] > 0
        assert set(m["per_engine"]) == {"engine-0", "engine-1", "engine-2", "engine-3"}
        assert sum(e["requests"] for e in m["per_engine"].values()) == m["requests"]
        if run["target"] == "oracle":
            assert m["routed"] == m["requests"]
        else:
            assert m["gateway_cpu_ms_per_req"] > 0 and m["gateway_peak_rss_mb"] > 0
        if run["target"] == "pixiu-kv":
            # Every request of a cache-aware gateway gets a verdict: routed or fallback.
            assert m["routed"] + m["fallback"] == m["requests"]
    # Later turns of a conversation reuse the earlier ones: the engines report cached tokens.
    multi = [r for r in runs if r["workload"] == "multi-turn"]
    assert all(r["metrics"]["cached_tokens"] > 0 for r in multi)

    for workload in ("shared-prefix", "multi-turn"):
        for target in ("round-robin", "pixiu-kv", "oracle", "external"):
            record = json.loads((out / "runs" / f"{workload}__{target}.json").read_text())
            assert record["workload"] == workload and record["target"] == target
            if target == "external":
                assert "no --external-url" in record["unavailable"]
            else:
                assert record["ttft_s"] and record["timeline"]
        for plot in ("ttft_cdf", "engine_load", "hit_ratio"):
            assert (out / "plots" / f"{plot}__{workload}.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| round-robin |" in summary and "| oracle |" in summary
    assert "external: unavailable: no --external-url given" in summary
    assert "## Goals" in summary
