"""The benchmark scripts run end to end in their --smoke mode, so they do not rot.

Not timed tests: no figure is asserted, only that each script completes, prints its
table and writes its JSON and PNG. Peers that are not installed (nginx, wrk, LiteLLM)
are skipped by the script with a message, never a failure.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_smoke(
    script: str, *args: str, out: Path, timeout: float, env: dict[str, str] | None = None
) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH.parent,
        env=None if env is None else {**os.environ, **env},
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def written(out: Path, name: str) -> dict[str, object]:
    assert (out / f"{name}.png").stat().st_size > 0
    data: dict[str, object] = json.loads((out / f"{name}.json").read_text())
    machine = data["machine"]
    assert isinstance(machine, dict) and machine["cores"] and machine["python"]
    return data


@pytest.mark.timeout(240)
def test_overhead_smoke_measures_direct_and_activator_and_skips_missing_peers(
    tmp_path: Path,
) -> None:
    stdout = run_smoke("overhead.py", out=tmp_path, timeout=220)
    data = written(tmp_path, "overhead-smoke")
    summary = data["summary"]
    assert isinstance(summary, dict)
    for by_peer in summary["stream_chunks_per_s"].values():
        assert by_peer["direct"] and by_peer["activator"]
    assert "| target" in stdout


@pytest.mark.timeout(120)
def test_cold_start_smoke_reports_wake_overhead_from_the_engine_log(tmp_path: Path) -> None:
    stdout = run_smoke("cold_start.py", "--local", out=tmp_path, timeout=100)
    data = written(tmp_path, "cold_start-smoke")
    trials = data["trials"]
    assert isinstance(trials, dict)
    for runs in trials.values():
        assert all(r["engine_ready_source"] == "engine log" for r in runs)
        assert all(r["wake_overhead_s"] is not None for r in runs)
    assert "wake overhead" in stdout


@pytest.mark.timeout(120)
def test_burst_smoke_answers_every_held_request_with_one_start(tmp_path: Path) -> None:
    run_smoke("burst.py", out=tmp_path, timeout=100)
    result = written(tmp_path, "burst-smoke")["result"]
    assert isinstance(result, dict)
    assert result["lost"] == 0
    assert result["engine_starts"] == 1


@pytest.mark.timeout(120)
def test_a_script_without_matplotlib_skips_its_plot_with_a_message(tmp_path: Path) -> None:
    # A `matplotlib` first on the path that fails to import, as an absent one does.
    shadow = tmp_path / "shadow"
    (shadow / "matplotlib").mkdir(parents=True)
    (shadow / "matplotlib" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n"
    )
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    out = tmp_path / "out"
    stdout = run_smoke("burst.py", out=out, timeout=100, env={"PYTHONPATH": path})
    assert "matplotlib: not importable" in stdout
    assert "burst-smoke.png skipped" in stdout
    assert "| burst" in stdout  # the report is printed all the same
    assert "smoke: not judged" in stdout and "MISSED" not in stdout
    assert not (out / "burst-smoke.png").exists()
    result = json.loads((out / "burst-smoke.json").read_text())["result"]
    assert result["lost"] == 0


@pytest.mark.timeout(120)
def test_swap_smoke_reports_swap_overhead(tmp_path: Path) -> None:
    run_smoke("swap.py", out=tmp_path, timeout=100)
    data = written(tmp_path, "swap-smoke")
    assert data["benchmark"] == "swap"


@pytest.mark.timeout(120)
def test_swap_sleep_mode_smoke_reports_the_overhead_over_the_engines_sleep_and_wake(
    tmp_path: Path,
) -> None:
    stdout = run_smoke("swap.py", "--mode", "sleep", out=tmp_path, timeout=100)
    data = written(tmp_path, "swap-sleep-smoke")
    (run,) = data["runs"]  # type: ignore[misc]
    assert len(run["trials"]) == 2 and len(run["stop_first_bytes"]) == 1
    for trial in run["trials"]:  # the engines' own parts are real readings, not zeros
        assert trial["engine_sleep"] > 0 and trial["engine_wake"] > 0
        assert trial["first_byte"] > trial["engine_sleep"] + trial["engine_wake"]
    assert "sleep swap is" in stdout


@pytest.mark.timeout(120)
def test_kube_wake_smoke_reports_pod_ready_to_first_byte(tmp_path: Path) -> None:
    stdout = run_smoke("kube_wake.py", out=tmp_path, timeout=100)
    data = written(tmp_path, "kube_wake-smoke")
    trials = data["trials"]
    assert isinstance(trials, list) and len(trials) == 2
    assert all(t["wake_overhead_s"] > 0 for t in trials)
    assert "pod Ready -> first byte" in stdout


@pytest.mark.timeout(120)
def test_metrics_scale_smoke_reports_scrapes_and_latency_per_model_count(tmp_path: Path) -> None:
    stdout = run_smoke("metrics_scale.py", out=tmp_path, timeout=100)
    data = written(tmp_path, "metrics_scale-smoke")
    results = data["results"]
    assert isinstance(results, list)
    assert [r["models"] for r in results] == [3, 30]
    for r in results:
        assert r["idle_scrape"]["bytes"] > 0
        assert r["idle_scrape"]["created_series"] == 0
        assert r["startup_s"] > 0
        assert all(r["warm"][mode]["requests"] > 0 for mode in ("none", "interval", "busy"))
        assert r["warm"]["busy"]["scrapes"] > 0
    # More models, more series: the idle ones are in the exposition too.
    assert results[1]["idle_scrape"]["series"] > results[0]["idle_scrape"]["series"]
    assert "| models" in stdout


@pytest.mark.timeout(180)
def test_scale_out_smoke_reports_throughput_per_replica_count_and_the_load_step(
    tmp_path: Path,
) -> None:
    stdout = run_smoke("scale_out.py", out=tmp_path, timeout=160)
    data = written(tmp_path, "scale_out-smoke")
    by_replicas = data["by_replicas"]
    assert isinstance(by_replicas, dict)
    assert sorted(by_replicas) == ["1", "2", "4"]
    assert all(s["rps"] > 0 and s["errors"] == 0 for s in by_replicas.values())
    runs = data["runs"]
    assert isinstance(runs, list)
    assert all(r["routed_before_ready"] == 0 for r in runs)  # through activator's proxy
    step = data["step"]
    assert isinstance(step, dict)
    assert step["routed_before_ready"] == 0  # a correctness check, not a timing one
    assert [d["to"] for d in step["decisions"]][:1] == [4]
    assert "| replicas" in stdout and "Ready -> routed" in stdout


@pytest.mark.timeout(240)
def test_packing_smoke_runs_the_three_scenarios_and_keeps_the_reports_within_the_bound(
    tmp_path: Path,
) -> None:
    stdout = run_smoke("packing.py", out=tmp_path, timeout=220)
    data = written(tmp_path, "packing-smoke")
    three = data["three"]
    assert isinstance(three, dict)
    assert three["observer"]["engine_processes"] >= 3
    assert three["observer"]["reported_within_bound"]  # the external observer's bound
    trace = data["trace"]
    assert isinstance(trace, dict)
    assert [r["policy"] for r in trace["runs"]] == ["whole-gpu", "memory"]
    for run in trace["runs"]:
        assert run["errors"] == 0 and run["answered"] == run["requests"]
        assert run["observer"]["reported_within_bound"]
    overlap = data["overlap"]
    assert isinstance(overlap, dict)
    for run in overlap["runs"]:
        assert all(t["engine_sleep_s"] and t["engine_wake_s"] for t in run["trials"])
    assert "smoke: not judged" in stdout and "MISSED" not in stdout
    assert ignored_by_git("bench/results/packing-smoke.json")


def ignored_by_git(path: str) -> bool:
    """Whether the repository's .gitignore ignores `path` (its patterns are globs)."""
    patterns = (BENCH.parent / ".gitignore").read_text().splitlines()
    return any(p and not p.startswith("#") and fnmatch.fnmatch(path, p) for p in patterns)


@pytest.mark.timeout(120)
def test_usage_scan_smoke_writes_only_an_ignored_file(tmp_path: Path) -> None:
    run_smoke("usage_scan.py", out=tmp_path, timeout=100)
    assert [p.name for p in tmp_path.iterdir()] == ["usage_scan-smoke.json"]
    assert ignored_by_git("bench/results/usage_scan-smoke.json")
    assert not ignored_by_git("bench/results/usage_scan.json")  # the committed figures


def bench_module(name: str) -> ModuleType:
    """A bench script as a module (they import benchlib as a sibling)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_overhead_report_without_wrk_says_how_to_install_it_and_a_smoke_run_judges_nothing() -> (
    None
):
    overhead = bench_module("overhead")
    missed = [{"target": "req/s vs nginx, c=32", "measured": 0.1, "goal": ">= 0.25", "met": False}]
    summary = {"wrk": {}, "stream_chunks_per_s": {}, "chunk_latency": {}, "targets": missed}
    text = overhead.report(summary, smoke=True)
    assert "wrk is not installed (apt-get install wrk" in text
    assert "| conc" not in text  # no empty table
    assert "smoke: not judged" in text and "MISSED" not in text
    assert "MISSED" in overhead.report(summary, smoke=False)  # a full run is judged
