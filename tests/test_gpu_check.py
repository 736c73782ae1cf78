"""The GPU check's machinery, on the CPU: every op has a smoke call, phases are cut at their limits and still
report, results fit what the GPU machine sends back, and a stale prebuilt extension is never loaded."""

import json
import os
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402
import gpu_smoke  # noqa: E402


def test_smoke_calls_every_op_and_matches_the_generic_build():
    import ftcore

    assert set(gpu_smoke.CALLS) == set(ftcore.check_registrations("CPU"))
    results = gpu_smoke.run(gpu_smoke.torch.device("cpu"))
    assert len(results) == len(set(fn for fn, _ in gpu_smoke.CALLS.values()))


def test_smoke_comparison_catches_a_wrong_result():
    torch = gpu_smoke.torch
    good = (torch.arange(10.0),)
    gpu_smoke.compare("op", "float", good, good)
    with pytest.raises(AssertionError, match="op output 0"):
        gpu_smoke.compare("op", "float", (torch.arange(10.0) + 1,), good)
    with pytest.raises(AssertionError, match="non-finite"):
        gpu_smoke.compare("op", "float", (torch.full((10,), float("nan")),), good)


def _context(tmp_path, budget=60.0):
    return gpu_check.Context(dry=True, results_dir=str(tmp_path), stem=str(tmp_path / "gpu-check-x"),
                             deadline=time.monotonic() + budget, meta={})


def test_a_command_past_its_limit_is_killed_with_its_children(tmp_path):
    ctx = _context(tmp_path)
    log = str(tmp_path / "log")
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    start = time.monotonic()
    r = gpu_check.run_command(ctx, [sys.executable, "-c", code], 3, log)
    assert r["timed_out"] and time.monotonic() - start < 30
    text = open(log).read()
    assert "started" in text and "killed at its time limit" in text


def test_the_run_deadline_shortens_a_phase_and_refuses_one_without_time(tmp_path):
    ctx = _context(tmp_path, budget=4)
    with pytest.raises(gpu_check.OutOfTime):
        gpu_check.run_command(ctx, [sys.executable, "-c", "pass"], 100, str(tmp_path / "log"))


def test_results_come_back_flat_and_small(tmp_path, monkeypatch):
    ctx = _context(tmp_path / "results")
    os.makedirs(ctx.results_dir)
    for suffix in gpu_check.SUFFIXES:
        with open(ctx.path(suffix), "w") as f:
            f.write("x")
    with open(ctx.path("-memcheck.log"), "wb") as f:
        f.write(b"start\n" + os.urandom(6 << 20) + b"\nERROR SUMMARY: 0 errors\n")
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    copied = gpu_check.copy_out(ctx)
    assert len(copied) == len(gpu_check.SUFFIXES) <= 8
    assert sorted(os.listdir(out)) == sorted(copied)  # flat: no folders
    for name in copied:
        assert os.path.getsize(out / name) <= gpu_check.LOG_LIMIT <= 16 << 20
    cut = open(out / "gpu-check-x-memcheck.log", "rb").read()
    assert cut.startswith(b"start\n") and cut.endswith(b"ERROR SUMMARY: 0 errors\n")


def test_a_stale_prebuilt_extension_is_refused():
    stamp = {"torch": "2.11.0+cu130", "sources": gpu_check.source_digest()}
    assert gpu_check.prebuilt_mismatch(stamp, "2.11.0+cu130") is None
    assert "is for torch 2.11.0+cu130" in gpu_check.prebuilt_mismatch(stamp, "2.12.0+cu130")
    assert "other sources" in gpu_check.prebuilt_mismatch(dict(stamp, sources="0" * 16), "2.11.0+cu130")
    assert "no prebuilt" in gpu_check.prebuilt_mismatch(None, "2.11.0+cu130")


def test_sanitizer_and_pytest_summaries_are_read():
    memcheck = "========= COMPUTE-SANITIZER\ngpu_smoke: 22 ops called on cuda, 12 groups, all ok\n========= ERROR SUMMARY: 0 errors\n"
    race = "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
    assert gpu_check.parse_sanitizer_text(memcheck)["errors"] == 0
    assert gpu_check.parse_sanitizer_text(race) == {"errors": 1, "hazards": 3, "warnings": 2, "line": race.strip("=\n ")}
    assert gpu_check.parse_sanitizer_text("Segmentation fault") is None
    text = "FAILED tests/test_x.py::test_a[cuda] - AssertionError\n=== 440 passed, 2 failed, 20 skipped, 3 warnings in 71.2s ==="
    assert gpu_check.parse_pytest_counts(text) == {"passed": 440, "failed": 2, "skipped": 20, "warning": 3}


def test_dry_run_reports_every_phase(tmp_path):
    """The runner end to end without a GPU, on the two quick phases (CI runs all of them: make gpu-check DRY=1)."""
    assert gpu_check.main(["--dry-run", "--phases", "sanitizer", "--results-dir", str(tmp_path)]) == 0
    record = json.load(open(tmp_path / "gpu-check-dry-run.json"))
    status = {p["name"]: p["status"] for p in record["phases"]}
    assert status == {"build": "ok", "tests": "not run", "sanitizer": "skipped: no GPU", "bench": "not run", "e2e": "not run"}
    assert "| sanitizer | skipped: no GPU |" in open(tmp_path / "gpu-check-dry-run.md").read()


def test_carried_wheels_are_unpacked_only_where_missing(tmp_path, monkeypatch):
    import zipfile

    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    for name in ("ftcore_carried_probe", "pytest"):  # one missing here, one present
        with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", "VALUE = 1\n")
    monkeypatch.setattr(gpu_check, "WHEELS", str(wheels))
    monkeypatch.setattr(gpu_check, "CARRIED_SITE", str(site))
    assert gpu_check.unpack_carried_wheels() == ["ftcore_carried_probe"]
    assert (site / "ftcore_carried_probe" / "__init__.py").is_file() and not (site / "pytest").exists()
    assert str(site) in gpu_check.child_env()["PYTHONPATH"].split(os.pathsep)


def test_an_interrupted_phase_takes_its_processes_along(tmp_path, monkeypatch):
    """The device tool ends a command at its limit: whatever the phase started must end with it."""
    monkeypatch.setattr(gpu_check, "POLL_S", 0.5)
    ctx = _context(tmp_path)
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    def interrupt():
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt("signal 15")

    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_command(ctx, [sys.executable, "-c", code], 30, str(tmp_path / "log"), poll=interrupt)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"process {pid} outlived the interrupted phase")


def test_a_failing_measurement_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    import bench_quant

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench_quant, "bench_fused", broken)
    gpu_check.bench_child(str(tmp_path / "b.json"), tiny=True)
    data = json.load(open(tmp_path / "b.json"))
    assert data["fused"] == {"error": "RuntimeError: kernel exploded"}
    assert isinstance(data["int4_linear"], list) and isinstance(data["qat_step"], dict) and "targets" not in data
    assert "**fused: not measured**, RuntimeError: kernel exploded" in gpu_check.bench_markdown(data)
