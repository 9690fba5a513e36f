"""A tiny run of the simulator capacity benchmark: every request completes, and the report
has its figures. Structure only: never timings (the machine is shared)."""

from __future__ import annotations

import json

import pytest

from benchmarks.sim_capacity import main


def test_tiny_run_reports_every_request_kind(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--requests", "8", "--rounds", "1", "--keep-alive", "2", "--max-tokens", "3",
          "--servers", "lean", "--speed", "50"])
    report = json.loads(capsys.readouterr().out)
    assert report["max_tokens"] == 3 and report["requests"] == 8
    lean = report["lean"]
    assert set(lean) == {f"{kind}/{per}" for kind in ("health", "json", "stream") for per in (1, 2)}
    for key, row in lean.items():
        assert row["cpu_ms_per_request"] >= 0  # psutil counts in clock ticks: a tiny run may show 0
        assert row["max_in_flight"] == 8, key
        assert len(row["cpu_ms_rounds"]) == 1
    assert lean["stream/1"]["max_open_streams"] >= 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--max-tokens", "0"])
