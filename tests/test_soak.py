"""benchmarks/soak.py, run for a few seconds with two clients so that the script cannot rot: it starts
``dsv4 serve --model tiny-random`` with the injected fault, and must pass its own checks (no unexpected
answer, the injected fault seen, /health always 200, no KV cache held at idle, a clean SIGTERM). And its
verdict, fed a run that went wrong, must fail it: a soak that always passes proves nothing."""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console


@pytest.fixture(scope="module")
def soak() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("_dsv4_soak", Path(__file__).parent.parent / "benchmarks/soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.timeout(120)
def test_a_short_soak_passes(soak: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    status = soak.main(["--clients", "2", "--minutes", "0.05", "--fault-every", "1"])
    report = capsys.readouterr().out
    assert status == 0, report
    assert "PASS" in report and "injected fault" in report


def test_the_verdict_fails_what_went_wrong(soak: ModuleType) -> None:
    options = soak.parse_args([])
    console = Console(file=io.StringIO())

    def failures(**changes: object) -> list[str]:
        tally = soak.Tally()
        call = soak.fault_call("m")
        tally.record(call, "500 (injected fault)", soak.INJECTED, 0.1)
        probe = soak.HealthProbe("http://unused", 1.0, 1.0)
        probe.statuses["200"] = 1
        probe.latencies.append(0.001)
        run = soak.Run(tally, probe, 60.0, rss=[(0.0, 1000), (60.0, 1000)], idle_seconds=0.0, exit_code=0)
        run.metrics = {"dsv4_kv_cache_used_bytes": 0.0}
        for name, value in changes.items():
            if name == "outcome":
                tally.record(soak.Client(0, "m", 1).chat(), value, soak.UNEXPECTED, 0.1, "boom")
            elif name == "health":
                probe.statuses[str(value)] += 1
            elif name == "kv_used":
                run.metrics["dsv4_kv_cache_used_bytes"] = value
            else:
                setattr(run, name, value)
        return soak.report(run, options, console)

    assert failures() == []
    assert "unexpected answers" in failures(outcome="500")[0]
    assert "/health" in failures(health="503")[0]
    assert "KV cache held at idle" in failures(kv_used=4096.0)[0]
    assert "not idle" in failures(idle_seconds=None)[0]
    assert "died" in failures(died=True)[0]
    assert "SIGTERM" in failures(exit_code=None)[0]
    assert "ERROR" in failures(log_errors=["... ERROR dsv4.server [x] unhandled error"])[0]
