"""`make gpu-check`: one command that proves ftcore's CUDA path on a GPU machine, prepared so that a short
lease (about 15 minutes, at most 10 a command, no package registry) brings back everything it measured.

    python3 bench/gpu_check.py                       # on the GPU machine (what `make gpu-check` runs)
    python3 bench/gpu_check.py --dry-run             # anywhere: the same runner; GPU phases report "skipped: no GPU"
    python3 bench/gpu_check.py --phases bench e2e    # rerun some phases (the build phase always runs first)
    python3 bench/gpu_check.py --stage-prebuilt WHEEL   # `make gpu-prebuild`: keep a wheel's extension in .gpu-prebuilt/

Phases run one after another, each in processes of its own with its own time limit, and the results are written
(and copied to $OUT) after each one, so a run cut off at any point keeps what it finished:

  1. build      load .gpu-prebuilt/ (built here against the GPU machine's torch, from these very sources), or
                compile the extension in place for the GPU's architecture;
  2. tests      `pytest -m cuda`: every case of the suite that runs on the CUDA device, --maxfail=20, a per-test
                timeout, so a first run shows every failure and not just the first;
  3. sanitizer  compute-sanitizer memcheck on bench/gpu_smoke.py (every op once, small shapes, compared with the
                CPU), racecheck and synccheck on ftcore's own kernels (they use shared memory);
  4. bench      copy bandwidth and dense GEMM (the ceilings), the sparse-delta gradient vs dense-then-gather,
                Hadamard vs clone bandwidth, fused rotate + fake-quant, int4_linear, the QAT layer step;
  5. e2e        bench/bench_e2e.py: a bf16 training step of a Llama-3-8B-shaped model, ftcore sparse deltas and
                S²FT against PEFT LoRA and full fine-tuning (step time and peak memory).

Results: bench/results/gpu-check-<GPU>.md and .json, with -pytest.txt, -memcheck.log, -racecheck.log,
-synccheck.log and -phases.log beside them (a dry run writes to build/gpu-check-dry/). When $OUT names a folder,
those seven files are copied there, flat, after every phase; each is cut to its first and last megabytes if
it grows past 4 MiB.

The dry run (`make gpu-check DRY=1`, run in CI) exercises every phase without a GPU: it reports on the prebuilt
extension, collects the real test selection (FTCORE_TEST_DEVICES=cpu,cuda pytest -m cuda --collect-only), runs
gpu_smoke on the CPU, and the benchmarks and the end-to-end step on tiny CPU shapes.
"""

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

STARTED = time.monotonic()  # a run's budget counts from the script's start: imports and CUDA start-up are part of it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
PREBUILT = os.path.join(ROOT, ".gpu-prebuilt")
EXTENSION = "_C.abi3.so"
LOG_LIMIT = 4 << 20  # bytes a log keeps (its head and tail) so that every file can come back from the machine
POLL_S = 15  # while a phase runs, its report and logs are rewritten and copied to $OUT this often
SUFFIXES = [".md", ".json", "-pytest.txt", "-memcheck.log", "-racecheck.log", "-synccheck.log", "-phases.log"]


# ---- sources, the prebuilt extension -------------------------------------------------------------------------


def source_digest() -> str:
    """sha256 over every file the extension is compiled from (csrc/ and setup.py): a prebuilt extension is used
    only if it was built from exactly these sources."""
    h = hashlib.sha256()
    paths = [os.path.join(ROOT, "setup.py")]
    for base, _, files in os.walk(os.path.join(ROOT, "csrc")):
        paths += [os.path.join(base, f) for f in files]
    for path in sorted(paths):
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def stage_prebuilt(wheel: str) -> None:
    """Keeps a wheel's compiled extension in .gpu-prebuilt/ with a stamp of the torch and sources it was built
    from (run by `make gpu-prebuild` under the GPU machine's torch). Host debug info is stripped (the device code
    and its line info stay): the folder travels with every device call."""
    import torch

    os.makedirs(PREBUILT, exist_ok=True)
    target = os.path.join(PREBUILT, EXTENSION)
    with zipfile.ZipFile(wheel) as z, open(target, "wb") as f:
        f.write(z.read(f"ftcore/{EXTENSION}"))
    if shutil.which("strip"):
        subprocess.run(["strip", "--strip-debug", target], check=True)
    stamp = {"torch": torch.__version__, "sources": source_digest(), "commit": git_commit(),
             "cuda_archs": os.environ.get("FTCORE_CUDA_ARCHS", "80;90"), "built": datetime.datetime.now().isoformat(timespec="seconds"),
             "wheel": os.path.basename(wheel)}
    with open(os.path.join(PREBUILT, "stamp.json"), "w") as f:
        json.dump(stamp, f, indent=2)
    print(f"staged {target} ({os.path.getsize(target) / 2**20:.1f} MiB) for torch {stamp['torch']}, sources {stamp['sources']}")


def prebuilt_stamp() -> Optional[dict]:
    try:
        with open(os.path.join(PREBUILT, "stamp.json")) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    return stamp if os.path.isfile(os.path.join(PREBUILT, EXTENSION)) else None


def prebuilt_mismatch(stamp: Optional[dict], torch_version: str) -> Optional[str]:
    """Why the prebuilt extension cannot serve this torch and these sources (None: it can)."""
    if stamp is None:
        return "no prebuilt extension (.gpu-prebuilt/; `make gpu-prebuild` makes one)"
    if stamp.get("torch") != torch_version:
        return f"the prebuilt extension is for torch {stamp.get('torch')}, this is {torch_version}"
    if stamp.get("sources") != source_digest():
        return f"the prebuilt extension was built from other sources ({stamp.get('sources')}, these are {source_digest()})"
    return None


# ---- running phases --------------------------------------------------------------------------------------------


class OutOfTime(Exception):
    pass


@dataclass
class Context:
    dry: bool
    results_dir: str
    stem: str  # results path without suffix
    deadline: float  # of the whole run
    meta: dict
    record: dict = field(default_factory=dict)
    build_ok: bool = True
    phase_deadline: float = float("inf")  # the run's deadline less the time kept for the phases after this one
    phases: List[dict] = field(default_factory=list)  # the report's rows
    current: Optional[dict] = None  # the row of the phase that runs now

    def path(self, suffix: str) -> str:
        return self.stem + suffix

    def remaining(self) -> float:
        return min(self.deadline, self.phase_deadline) - time.monotonic()

    def progress(self) -> None:
        """Rewrites the report and copies everything to $OUT: a run cut off now keeps what it has. A failure
        here is printed, never allowed to stop the phase that is measuring."""
        try:
            write_report(self, self.phases)
            copy_out(self)
        except Exception:  # noqa: BLE001
            traceback.print_exc()


WHEELS = os.path.join(PREBUILT, "wheels")
CARRIED_SITE = os.path.join(ROOT, "build", "gpu-site")


def unpack_carried_wheels() -> List[str]:
    """The GPU machine has no package registry: pure-Python packages the tests need and it lacks (expecttest,
    for opcheck) travel as wheels in .gpu-prebuilt/wheels/ and are unpacked into build/gpu-site/, which the
    phases' processes get on their path. Returns the names unpacked (none where all are importable)."""
    unpacked = []
    if not os.path.isdir(WHEELS):
        return unpacked
    for wheel in sorted(os.listdir(WHEELS)):
        name = wheel.split("-")[0]
        if wheel.endswith(".whl") and importlib.util.find_spec(name) is None:
            with zipfile.ZipFile(os.path.join(WHEELS, wheel)) as z:
                z.extractall(CARRIED_SITE)
            unpacked.append(name)
    return unpacked


def child_env() -> dict:
    env = dict(os.environ)
    paths = [ROOT] + ([CARRIED_SITE] if os.path.isdir(CARRIED_SITE) else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


# A process group of its own (killable with everything it started) but the caller's session: the device
# machine ends a command's leftover processes when it returns, except those that started a session of their own.
NEW_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def stop(proc: subprocess.Popen) -> Optional[int]:
    """SIGTERM to the whole process group, SIGKILL 5 s later if anything is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode


def run_command(ctx: Context, cmd: List[str], limit: float, log: str, env: Optional[dict] = None,
                poll: Optional[Callable[[], None]] = None) -> dict:
    """Runs cmd with its output appended to `log`, killing its process group past min(limit, the time the phase
    has left); every POLL_S seconds calls `poll` and saves the report. Returns rc, seconds, timed_out."""
    if ctx.remaining() < 5:
        raise OutOfTime()
    limit = min(limit, ctx.remaining())
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}   (limit {limit:.0f} s)\n")
        out.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT, **NEW_GROUP)
        timed_out = False
        try:
            while True:
                try:
                    rc = proc.wait(timeout=max(0.1, min(POLL_S, start + limit - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= start + limit:
                        timed_out = True
                        rc = stop(proc)
                        break
                    if poll is not None:
                        poll()
                    ctx.progress()
        except BaseException:  # interrupted (the device's time limit): nothing of ours outlives the run
            stop(proc)
            raise
        seconds = time.monotonic() - start
        out.write(f"[exit {rc}{', killed at its time limit' if timed_out else ''} after {seconds:.1f} s]\n")
    return {"rc": rc, "seconds": seconds, "timed_out": timed_out}


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def cut_log(path: str) -> None:
    """Keeps a log under LOG_LIMIT: its first megabyte and the rest of the budget from its end."""
    if not os.path.isfile(path) or os.path.getsize(path) <= LOG_LIMIT:
        return
    head_bytes = 1 << 20
    with open(path, "rb") as f:
        head = f.read(head_bytes)
        f.seek(-(LOG_LIMIT - head_bytes - 256), os.SEEK_END)
        rest = f.read()
    with open(path, "wb") as f:
        f.write(head + b"\n\n[... cut to keep the file under 4 MiB ...]\n\n" + rest)


def copy_out(ctx: Context) -> List[str]:
    """Copies the result files to $OUT (flat: the device machine returns at most 8 files, two folders deep)."""
    out = os.environ.get("OUT")
    copied = []
    if not out:
        return copied
    os.makedirs(out, exist_ok=True)
    for suffix in SUFFIXES:
        src = ctx.path(suffix)
        if os.path.isfile(src):
            cut_log(src)
            shutil.copyfile(src, os.path.join(out, os.path.basename(src)))
            copied.append(os.path.basename(src))
    return copied


# ---- the phases ------------------------------------------------------------------------------------------------

PhaseFn = Callable[[Context], dict]


@dataclass
class Phase:
    name: str
    limit_s: float  # the phase's own limit (its commands share it); the run's deadline can cut it shorter
    needs_gpu: bool
    fn: PhaseFn
    would_run: str  # what it runs, for the table
    reserve_s: float  # kept for this phase: the phases before it may not run into it


def import_check_code(cuda: bool) -> str:
    checks = "ftcore.check_registrations('CPU')"
    if cuda:
        checks += ("; assert ftcore.cuda_kernels_available(), 'no CUDA kernels in this build'; "
                   "ftcore.check_registrations('CUDA'); x = torch.randn(4, 64, device='cuda'); "
                   "torch.testing.assert_close(ftcore.hadamard_transform(x).cpu(), ftcore.hadamard_transform(x.cpu()))")
    return f"import torch, ftcore; {checks}; print('import check: ftcore', ftcore.__version__, 'on torch', torch.__version__)"


def phase_build(ctx: Context) -> dict:
    log = ctx.path("-phases.log")
    torch_version = ctx.meta["torch"]
    stamp = prebuilt_stamp()
    why_not = prebuilt_mismatch(stamp, torch_version)
    details = {"prebuilt": stamp, "prebuilt_usable": why_not is None, "why_not_prebuilt": why_not}
    if ctx.dry:
        r = run_command(ctx, [sys.executable, "-c", import_check_code(cuda=False)], 120, log)
        if stamp is None:
            plan = "no .gpu-prebuilt/ (`make gpu-prebuild`): a GPU machine compiles the extension first"
        elif stamp["sources"] != source_digest():
            plan = f".gpu-prebuilt/ is stale (sources {stamp['sources']}, now {source_digest()}): a GPU machine compiles"
        else:
            plan = f".gpu-prebuilt/ matches these sources: a GPU machine with torch {stamp['torch']} loads it"
        details["plan_on_gpu"] = plan
        return {"status": "ok" if r["rc"] == 0 else "failed", "seconds": r["seconds"], "details": details,
                "summary": f"the CPU build imports; {plan}"}
    target = os.path.join(ROOT, "ftcore", EXTENSION)
    seconds = 0.0
    if why_not is None:
        shutil.copyfile(os.path.join(PREBUILT, EXTENSION), target + ".tmp")
        os.replace(target + ".tmp", target)  # never rewrite in place a file a process may have mapped
        r = run_command(ctx, [sys.executable, "-c", import_check_code(cuda=True)], 120, log)
        seconds += r["seconds"]
        if r["rc"] == 0:
            return {"status": "ok", "seconds": seconds, "details": details,
                    "summary": f"prebuilt extension loaded (sources {stamp['sources']}, built {stamp['built']})"}
        details["why_not_prebuilt"] = why_not = "the prebuilt extension failed its import check (see -phases.log)"
    major, minor = ctx.meta["capability"]
    env = child_env()
    env.update(FTCORE_CUDA="1", FTCORE_CUDA_ARCHS=f"{major}{minor}", MAX_JOBS=str(os.cpu_count() or 4))
    r = run_command(ctx, [sys.executable, "setup.py", "build_ext", "--inplace"], 420, log, env)
    seconds += r["seconds"]
    details["compile_seconds"] = r["seconds"]
    if r["rc"] != 0:
        ctx.build_ok = False
        return {"status": "timeout" if r["timed_out"] else "failed", "seconds": seconds, "details": details,
                "summary": f"compiling failed ({why_not}); see -phases.log"}
    r = run_command(ctx, [sys.executable, "-c", import_check_code(cuda=True)], 120, log)
    seconds += r["seconds"]
    ctx.build_ok = r["rc"] == 0
    return {"status": "ok" if ctx.build_ok else "failed", "seconds": seconds, "details": details,
            "summary": f"compiled for sm_{major}{minor} in {details['compile_seconds']:.0f} s ({why_not})"}


PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")


def parse_pytest_counts(text: str) -> Dict[str, int]:
    """{"passed": n, "failed": n, "error": n, ...} from pytest's last summary line."""
    line = next((line for line in reversed(text.splitlines()) if PYTEST_COUNTS.search(line) and " in " in line), "")
    return {(what.rstrip("s") if what.startswith(("error", "warning")) else what): int(n)
            for n, what in PYTEST_COUNTS.findall(line)}


XDIST_WORKERS = 4


def pytest_command(dry: bool) -> List[str]:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider"]
    if dry:
        return cmd + ["--collect-only"]
    cmd[cmd.index("-q")] = "-v"  # every outcome streams to the log as it happens
    cmd += ["--maxfail=20"]
    if importlib.util.find_spec("pytest_timeout"):
        # thread method: a test stuck in a CUDA synchronisation cannot take a signal; the thread dumps the
        # stacks and ends the worker, which xdist reports as crashed in that test and replaces
        cmd += ["--timeout=120", "--timeout-method=thread"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(XDIST_WORKERS)]
    return cmd


def phase_tests(ctx: Context) -> dict:
    log = ctx.path("-pytest.txt")
    env = child_env()
    if ctx.dry:
        env["FTCORE_TEST_DEVICES"] = "cpu,cuda"  # collect the CUDA cases without a GPU
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 4) // XDIST_WORKERS))  # workers share the cores
    cmd = pytest_command(ctx.dry)
    r = run_command(ctx, cmd, 240, log, env)
    text = tail(log, 400)
    details = {"command": " ".join(cmd[1:]), "rc": r["rc"],
               "failures": [line.strip() for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))][:60]}
    if ctx.dry:
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
        details["collected"] = int(m.group(1)) if m else 0
        ok = r["rc"] == 0 and details["collected"] > 0
        return {"status": "skipped: no GPU" if ok else "failed", "seconds": r["seconds"], "details": details,
                "summary": f"{details['collected']} CUDA cases collected (--collect-only)" if ok else "collection failed: see -pytest.txt"}
    details["counts"] = counts = parse_pytest_counts(text)
    status = "timeout" if r["timed_out"] else ("ok" if r["rc"] == 0 else "failed")
    summary = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no summary (see -pytest.txt)"
    return {"status": status, "seconds": r["seconds"], "details": details, "summary": summary}


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(
        (os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda-")), reverse=True)]
    for home in homes:
        path = os.path.join(home, "bin", "compute-sanitizer")
        if home and os.path.isfile(path):
            return path
    return None


SANITIZER_TOOLS = {
    # tool: (extra arguments, time limit). memcheck checks every kernel the smoke process launches (torch's
    # too: ftcore's composite ops run through them), but not CUDA API return codes: torch probes features
    # whose failures it expects, and ftcore's own API calls are checked in the code (C10_CUDA_CHECK), so a
    # failing one fails the smoke run. racecheck and synccheck look at ftcore's kernels only, the ones with
    # shared memory and barriers of their own.
    "memcheck": (["--tool", "memcheck", "--report-api-errors", "no"], 120),
    "racecheck": (["--tool", "racecheck", "--racecheck-report", "all", "--kernel-name", "kns=ftcore"], 90),
    "synccheck": (["--tool", "synccheck", "--kernel-name", "kns=ftcore"], 60),
}
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")


def parse_sanitizer_text(text: str) -> Optional[dict]:
    """The error summary compute-sanitizer printed last (None: it printed none, e.g. the process crashed)."""
    race = list(RACECHECK_SUMMARY.finditer(text))
    if race:
        m = race[-1]
        return {"errors": int(m.group(2)), "hazards": int(m.group(1)), "warnings": int(m.group(3)), "line": m.group(0)}
    errors = list(ERROR_SUMMARY.finditer(text))
    if errors:
        return {"errors": int(errors[-1].group(1)), "line": errors[-1].group(0)}
    return None


# compute-sanitizer runs on some GPU machines and not others (refused on gVisor, seen here): say so, do not
# report it as a kernel failure.
SANITIZER_REFUSED = ("Device not supported", "Unable to find injection library", "Target application terminated before first instrumented API call")


def phase_sanitizer(ctx: Context) -> dict:
    smoke = [sys.executable, os.path.join(BENCH, "gpu_smoke.py")]
    if ctx.dry:
        r = run_command(ctx, smoke + ["--device", "cpu"], 120, ctx.path("-phases.log"))
        return {"status": "skipped: no GPU" if r["rc"] == 0 else "failed", "seconds": r["seconds"],
                "summary": "gpu_smoke ran every op on the CPU" if r["rc"] == 0 else "gpu_smoke failed on the CPU: see -phases.log"}
    sanitizer = find_sanitizer()
    if sanitizer is None:
        return {"status": "failed", "seconds": 0.0, "summary": "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"}
    env = child_env()
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every tensor its own allocation: an overrun is out of bounds
    details, seconds, statuses = {}, 0.0, []
    for tool, (args, limit) in SANITIZER_TOOLS.items():
        log = ctx.path(f"-{tool}.log")
        try:
            r = run_command(ctx, [sanitizer, "--error-exitcode", "97", "--print-limit", "50", "--launch-timeout", "60",
                                  *args, *smoke, "--device", "cuda"], limit, log, env)
        except OutOfTime:
            details[tool] = {"status": "skipped: out of time"}
            statuses.append("skipped: out of time")
            continue
        seconds += r["seconds"]
        text = tail(log, 100000)
        found = parse_sanitizer_text(text)
        smoke_ok = "all ok" in text
        if r["timed_out"]:
            status = "timeout"
        elif not smoke_ok and any(s in text for s in SANITIZER_REFUSED):
            status = "unavailable"  # the tool cannot instrument this machine
        elif found is not None and found["errors"] == 0 and r["rc"] == 0 and smoke_ok:
            status = "ok"
        else:
            status = "failed"
        details[tool] = {"status": status, "rc": r["rc"], "seconds": r["seconds"], "summary": found, "smoke_completed": smoke_ok}
        statuses.append(status)
    status = "ok" if all(s == "ok" for s in statuses) else next(s for s in statuses if s != "ok")
    summary = "; ".join(f"{t}: {d['summary']['line'] if d.get('summary') else d['status']}" for t, d in details.items())
    return {"status": status, "seconds": seconds, "details": details, "summary": summary}


def child_phase(ctx: Context, name: str, limit: float) -> dict:
    """Runs `gpu_check.py --child name` and reads back the JSON it rewrites after every measurement."""
    out = os.path.join(ctx.results_dir, f"{name}.partial.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--json", out] + (["--tiny"] if ctx.dry else [])

    def merge():  # what the child has measured so far goes into the report
        if ctx.current is not None:
            ctx.current["details"] = read_json(out)

    try:
        r = run_command(ctx, cmd, limit, ctx.path("-phases.log"), poll=merge)
    finally:
        merge()
    data = read_json(out)
    if os.path.exists(out):
        os.remove(out)
    errors = [k for k, v in data.items() if isinstance(v, dict) and "error" in v]
    errors += [k for k, v in data.get("rows", {}).items() if isinstance(v, dict) and "error" in v]
    if r["rc"] != 0:
        status = "timeout" if r["timed_out"] else "failed"
    elif errors:
        status = "partial"
    else:
        status = "skipped: no GPU" if ctx.dry else "ok"
    done = ", ".join(data["rows"] if name == "e2e" and "rows" in data else (k for k in data if k != "meta")) or "nothing"
    summary = (f"ran on the CPU at tiny sizes: {done}" if ctx.dry and r["rc"] == 0 else
               f"measured: {done}" + ("" if r["rc"] == 0 else " (see -phases.log)"))
    if errors:
        summary += f"; errors in: {', '.join(errors)} (see -phases.log)"
    return {"status": status, "seconds": r["seconds"], "details": data, "summary": summary}


PHASES = [
    Phase("build", 480, False, phase_build, "load .gpu-prebuilt/ if it matches torch and sources, else setup.py build_ext --inplace", 0),
    Phase("tests", 240, True, phase_tests, "pytest tests -m cuda --maxfail=20 --timeout=120 (-n 4 with xdist)", 90),
    Phase("sanitizer", 200, True, phase_sanitizer, "compute-sanitizer memcheck / racecheck / synccheck on bench/gpu_smoke.py", 60),
    Phase("bench", 150, True, lambda ctx: child_phase(ctx, "bench", 150), "ceilings, sparse-delta grad + step, Hadamard, fused, int4_linear, QAT step", 60),
    Phase("e2e", 150, True, lambda ctx: child_phase(ctx, "e2e", 150), "bench_e2e.py: 8 Llama-3-8B layers, 2 x 2048 tokens, 4 methods", 75),
]


# ---- children: the measurements --------------------------------------------------------------------------------


def dump(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def bench_child(json_path: str, tiny: bool) -> None:
    import torch

    sys.path.insert(0, BENCH)
    import bench_quant as quant
    import bench_sparse_delta as sparse

    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    reps = 1 if tiny else 5
    data: dict = {}

    def measured(key, fn):
        """One measurement; an error is recorded and the next one still runs."""
        try:
            data[key] = fn()
        except Exception as exc:  # noqa: BLE001  (report it, measure the rest)
            traceback.print_exc()
            data[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        dump(json_path, data)
        return data[key]

    ceil = measured("ceilings", lambda: sparse.ceilings(device, dtype, *((1 << 20, (64, 64, 64)) if tiny else (1 << 30, (8192, 8192, 8192)))))
    print(f"ceilings: {ceil}", flush=True)
    shapes = [(64, 128)] if tiny else [(4096, 4096), (4096, 14336)]
    densities = [0.01] if tiny else [0.001, 0.01, 0.05]
    tokens = 64 if tiny else 8192  # on a GPU: X and G (64 MB each at 4096) well past the L2 cache, as in training
    measured("sparse_delta_grad", lambda: sparse.bench_grad(shapes, densities, tokens, dtype, device, reps, ceil))
    measured("sparse_delta_step", lambda: sparse.bench_step(shapes[:1], [0.01], tokens, dtype, device, reps))
    sizes = [256, 768] if tiny else [1024, 2048, 4096, 8192, 16384, 32768, 3584, 4864, 11008, 14336, 18944]
    measured("hadamard", lambda: quant.bench_hadamard(device, dtype, (1 if tiny else 256) << 20, reps, sizes))
    measured("fused", lambda: quant.bench_fused(device, dtype, 32 if tiny else 8192, [256] if tiny else [4096, 4864, 14336], reps))
    measured("int4_linear", lambda: quant.bench_int4_linear(device, dtype, [(64, 128)] if tiny else [(4096, 4096), (4096, 14336)],
                                                            [1, 16] if tiny else [1, 16, 2048, 8192], reps))
    measured("qat_step", lambda: quant.bench_qat_step(device, dtype, *((32, 128, 64) if tiny else (8192, 14336, 4096)), reps))
    if all(isinstance(data.get(k), list) for k in ("sparse_delta_grad", "sparse_delta_step", "hadamard", "fused")) and "error" not in data["qat_step"]:
        checks = sparse.verdicts(data["sparse_delta_grad"], data["sparse_delta_step"], []) + quant.verdicts(
            device, data["hadamard"], data["fused"], data["qat_step"])
        measured("targets", lambda: [{"target": n, "met": ok, "measured": v} for n, ok, v in checks])


def e2e_child(json_path: str, tiny: bool) -> None:
    sys.path.insert(0, BENCH)
    import bench_e2e

    args = bench_e2e.parser().parse_args(["--tiny", "--layers", "2", "--seq", "64", "--warmup", "1", "--steps", "2"] if tiny
                                         else ["--layers", "8", "--batch", "2", "--seq", "2048", "--warmup", "2", "--steps", "5"])
    bench_e2e.run(args, record=lambda result: dump(json_path, result))


# ---- the report ------------------------------------------------------------------------------------------------


def gpu_meta(dry: bool) -> dict:
    import torch

    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "commit": git_commit(), "sources": source_digest(), "dry_run": dry,
            "command": "python3 bench/gpu_check.py " + " ".join(sys.argv[1:])}
    # the version from its file: the runner itself never loads the extension, which the build phase replaces
    with open(os.path.join(ROOT, "ftcore", "_version.py")) as f:
        meta["ftcore"] = re.search(r"__version__ = \"(.+?)\"", f.read()).group(1)
    if not dry:
        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)), multiprocessors=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            meta["nvidia_smi"] = smi
        except (OSError, subprocess.SubprocessError):
            pass
    return meta


def fmt(value, spec=".2f"):
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def table(title: str, columns: List[str], rows: list, cells: Callable[[dict], list]) -> List[str]:
    """A markdown section: a heading, then one row a measurement."""
    return ([f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows] + [""])


def bench_markdown(b: dict) -> List[str]:
    lines = [f"**{key}: not measured**, {value['error']}" for key, value in b.items() if isinstance(value, dict) and "error" in value]
    lines += [""] if lines else []
    b = {k: v for k, v in b.items() if not (isinstance(v, dict) and "error" in v)}
    if "ceilings" in b:
        c = b["ceilings"]
        lines += [f"Ceilings in this run: device copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write), dense GEMM "
                  f"{c['gemm_flops'] / 1e12:.1f} TFLOP/s.", ""]
    if b.get("sparse_delta_grad"):
        lines += table("Sparse-delta weight gradient vs dense-then-gather (target at 1%: >= 8x)",
                       ["shape", "density", "ftcore ms", "dense-then-gather ms", "speedup", "floor ms"], b["sparse_delta_grad"],
                       lambda r: [r["shape"], f"{r['density']:.1%}", f"{r['ftcore_ms']:.3f}", f"{r['dense_then_gather_ms']:.3f}",
                                  f"{r['speedup']:.1f}x", f"{r['floor_ms']:.3f}"])
    if b.get("sparse_delta_step"):
        lines += table("One layer's training step (targets: <= 1.15x frozen, <= 0.75x full)",
                       ["shape", "density", "sparse ms", "frozen ms", "full ms", "vs frozen", "vs full"], b["sparse_delta_step"],
                       lambda r: [r["shape"], f"{r['density']:.1%}", f"{r['sparse_ms']:.3f}", f"{r['frozen_ms']:.3f}",
                                  f"{r['full_ms']:.3f}", f"{r['vs_frozen']:.3f}", f"{r['vs_full']:.3f}"])
    if b.get("hadamard"):
        lines += table("hadamard_transform vs clone (target: copy fraction >= 0.85 for n <= 8192)",
                       ["n", "K", "rows", "ftcore ms", "GB/s", "copy fraction", "speedup vs butterfly", "speedup vs dense", "speedup vs fast-hadamard-transform"],
                       b["hadamard"],
                       lambda r: [r["n"], r["K"], r["rows"], f"{r['ms']['ftcore']:.3f}", f"{r['GB_per_s']:.0f}", f"{r['copy_fraction']:.2f}",
                                  f"{r['speedup_vs_butterfly']:.1f}x", fmt(r.get("speedup_vs_dense"), ".1f"),
                                  fmt(r.get("vs_fast_hadamard_transform"))])
    if b.get("fused"):
        lines += table("Fused rotate + fake-quant vs the unfused pair (target <= 0.6x)",
                       ["n", "tokens", "forward ratio", "forward + backward ratio", "fused fwd ms", "fused fwd+bwd ms"], b["fused"],
                       lambda r: [r["n"], r["tokens"], f"{r['forward_ratio']:.2f}x", f"{r['forward_backward_ratio']:.2f}x",
                                  f"{r['ms']['fused']:.3f}", f"{r['ms']['fused_fb']:.3f}"])
    if b.get("int4_linear"):
        sys.path.insert(0, BENCH)
        import bench_quant

        lines += ["### int4_linear (groups of 128)", ""] + bench_quant.int4_markdown(b["int4_linear"]) + [""]
    if b.get("qat_step"):
        q = b["qat_step"]
        lines += [f"QAT layer step {q['in']} → {q['out']}, {q['tokens']} tokens: RotatedQuantLinear {q['ms']['rotated_quant']:.2f} ms "
                  f"vs nn.Linear {q['ms']['linear']:.2f} ms = {q['ratio']:.2f}x (target <= 1.3x).", ""]
    if b.get("targets"):
        lines += table("Targets", ["target", "met", "measured"], b["targets"],
                       lambda t: [t["target"], "yes" if t["met"] else "NO", t["measured"]])
    return lines


def write_report(ctx: Context, phases: List[dict]) -> None:
    ctx.record.update(meta=ctx.meta, phases=phases)
    dump(ctx.path(".json"), ctx.record)
    m = ctx.meta
    title = f"GPU check on {m.get('gpu', 'no GPU (dry run)')}"
    lines = [f"# {title}", "",
             f"{m['date']} · torch {m['torch']} (CUDA {m['cuda']}) · Python {m['python']} · ftcore {m.get('ftcore')} · "
             f"commit {m.get('commit') or 'unknown'} · extension sources {m['sources']}" +
             (f" · {m['multiprocessors']} SMs, {m['memory_gb']} GiB · nvidia-smi: {m.get('nvidia_smi', '?')}" if "gpu" in m else ""),
             "", f"Command: `{m['command']}`", "",
             "| phase | status | seconds | limit s | summary | runs |", "|---|---|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p['name']} | {p['status']} | {fmt(p.get('seconds'), '.0f')} | {p['limit_s']:.0f} | "
                     f"{p.get('summary', '').replace('|', '/')} | {p['would_run']} |")
    by_name = {p["name"]: p for p in phases}
    tests = by_name.get("tests", {}).get("details") or {}
    if tests.get("failures"):
        lines += ["", "## Test failures (first 60)", ""] + [f"- `{f}`" for f in tests["failures"]]
    san = by_name.get("sanitizer", {}).get("details") or {}
    if san:
        lines += ["", "## compute-sanitizer", "", "| tool | status | summary | seconds |", "|---|---|---|---|"]
        for tool, d in san.items():
            lines.append(f"| {tool} | {d['status']} | {(d.get('summary') or {}).get('line', '–')} | {fmt(d.get('seconds'), '.0f')} |")
    # A dry run renders its tiny CPU figures too (so CI exercises this report), labelled as such.
    where = "CPU at tiny sizes, a dry run: not GPU figures" if m["dry_run"] else "bf16, short repeats"
    bench = by_name.get("bench", {}).get("details") or {}
    if bench:
        lines += ["", f"## Microbenchmarks ({where})", ""] + bench_markdown(bench)
    e2e = by_name.get("e2e", {}).get("details") or {}
    if e2e.get("rows"):
        sys.path.insert(0, BENCH)
        import bench_e2e

        lines += ["", f"## End to end: one training step ({where}; targets for S²FT: <= 0.7x full FT's time, <= 0.5x its "
                  "memory, no slower than LoRA)", ""] + bench_e2e.markdown(e2e["meta"], e2e["rows"])
    with open(ctx.path(".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def print_table(phases: List[dict]) -> None:
    print("\n| phase | status | seconds | summary |\n|---|---|---|---|")
    for p in phases:
        print(f"| {p['name']} | {p['status']} | {fmt(p.get('seconds'), '.0f')} | {p.get('summary', '')} |")


def main(argv=None, started: Optional[float] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: the same phases, GPU work skipped or on tiny CPU shapes")
    parser.add_argument("--phases", nargs="+", choices=[p.name for p in PHASES], help="only these (build always runs)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole run (the device allows 600 a command)")
    parser.add_argument("--results-dir", help="default: bench/results (GPU) or build/gpu-check-dry (dry run)")
    parser.add_argument("--stage-prebuilt", metavar="WHEEL", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["bench", "e2e"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_prebuilt:
        stage_prebuilt(args.stage_prebuilt)
        return 0
    if args.child:
        (bench_child if args.child == "bench" else e2e_child)(args.json, args.tiny)
        return 0

    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and dry:
        print("gpu_check: no CUDA device here: running the dry run (--dry-run)")
    meta = gpu_meta(dry)
    meta["carried_packages"] = unpack_carried_wheels()
    name = "dry-run" if dry else re.sub(r"[^A-Za-z0-9._-]+", "-", meta["gpu"]).strip("-")  # names $OUT can return
    results_dir = args.results_dir or (os.path.join(ROOT, "build", "gpu-check-dry") if dry else os.path.join(BENCH, "results"))
    os.makedirs(results_dir, exist_ok=True)
    ctx = Context(dry=dry, results_dir=results_dir, stem=os.path.join(results_dir, f"gpu-check-{name}"),
                  deadline=(started or time.monotonic()) + args.budget, meta=meta)
    for suffix in SUFFIXES[2:]:  # fresh logs for this run
        if os.path.exists(ctx.path(suffix)):
            os.remove(ctx.path(suffix))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_phases(ctx, args, dry, meta)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def run_phases(ctx: Context, args, dry: bool, meta: dict) -> int:
    wanted = set(args.phases or [p.name for p in PHASES]) | {"build"}
    ctx.phases = phases = [{"name": p.name, "status": "not run" if p.name not in wanted else "pending", "limit_s": p.limit_s,
                            "would_run": p.would_run} for p in PHASES]
    print(f"gpu_check: {'dry run, ' if dry else ''}{meta.get('gpu', 'no GPU')}, torch {meta['torch']}, budget {args.budget:.0f} s; "
          f"results in {os.path.relpath(ctx.stem, ROOT)}.*", flush=True)
    try:
        for i, (phase, row) in enumerate(zip(PHASES, phases)):
            if row["status"] == "not run":
                continue
            if phase.needs_gpu and not ctx.build_ok:
                row.update(status="skipped: build failed", summary="")
            else:
                print(f"[{phase.name}] {phase.would_run}", flush=True)
                # the phases still to come keep their reserve: a slow phase cannot starve the ones after it (the
                # build is exempt: nothing after it runs without it)
                later = sum(p.reserve_s for p, r in zip(PHASES[i + 1:], phases[i + 1:])
                            if r["status"] == "pending") if phase.needs_gpu else 0.0
                ctx.phase_deadline, ctx.current = ctx.deadline - later, row
                try:
                    row.update(phase.fn(ctx))
                except OutOfTime:
                    row.update(status="skipped: out of time",
                               summary=f"under 5 s left of the {args.budget:.0f} s budget (less {later:.0f} s kept for later phases)")
                ctx.phase_deadline, ctx.current = float("inf"), None
                if phase.name == "build" and row["status"] != "ok":
                    ctx.build_ok = False
            row.setdefault("summary", "")
            print(f"[{phase.name}] {row['status']} ({fmt(row.get('seconds'), '.0f')} s): {row['summary']}", flush=True)
            ctx.progress()
    except KeyboardInterrupt as exc:
        for row in phases:
            if row["status"] == "pending":
                row.update(status="interrupted", summary=str(exc))
        ctx.progress()
        raise
    print_table(phases)
    copied = copy_out(ctx)
    print(f"\nwrote {os.path.relpath(ctx.stem, ROOT)}.md / .json" + (f"; copied {len(copied)} files to $OUT" if copied else ""))
    bad = [p["name"] for p in phases if p["status"] not in ("ok", "not run", "skipped: no GPU")]
    if bad:
        print(f"gpu_check: not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
