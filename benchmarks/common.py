"""Helpers every benchmark shares: the machine line, interleaved timing, memory, JSON.

The machine is shared and noisy, so a benchmark never times one thing after another: it runs every
case once per round, in a rotating order, repeats the rounds, and reports medians and the median of
the per-round ratios. Absolute times are printed for the record, never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def ensure_quiet_threads() -> None:
    """Re-run this script with OMP_WAIT_POLICY=PASSIVE unless the user set a policy.

    On a shared 2-core machine, OpenMP threads that spin at barriers while another process holds a
    core turn a 4 ms decode step into ~100 ms (measured). The policy is read when torch loads its
    OpenMP runtime, i.e. before `main` runs, hence the re-exec instead of setting it here.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


# ---------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo (or platform when that is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that matter for the kernels torch picks."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if "flags" in ln), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
    return [f for f in wanted if f in flags]


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "flags": cpu_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def code_version() -> str:
    """The code a benchmark ran: "git <commit>" (plus a note when the package or the benchmarks
    differ from that commit), or "unknown" outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    changed = git("status", "--porcelain", "--", "src", "benchmarks")
    return f"git {head}" + (" with uncommitted changes" if changed else "")


def machine_line(info: dict[str, Any] | None = None) -> str:
    i = info or machine_info()
    return (
        f"machine: {i['cpu']} ({i['cores']} cores, {'/'.join(i['flags']) or 'no AVX'}), "
        f"torch {i['torch']} ({i['threads']} threads, OMP {i['omp_wait_policy']}), "
        f"python {i['python']}, {i['platform']}, load {i['load_average']:.1f} at start"
    )


# ---------------------------------------------------------------------- timing
CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of this process (all its threads): on a machine shared with other jobs this is
    # the latency the code would have alone, as long as torch runs one thread (--threads 1).
    "cpu": time.process_time,
}


def interleaved(
    cases: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    inner: dict[str, int] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of every case, one sample per round; cases alternate inside a round.

    `inner[name]` calls are made back to back per sample (and divided out) for cases too short to
    time alone. The order rotates each round so no case always runs right after the same one.
    """
    inner = inner or {}
    now = CLOCKS[clock]
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            k = inner.get(name, 1)
            start = now()
            for _ in range(k):
                cases[name]()
            elapsed = (now() - start) / k
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator/denominator measured in the same round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def spread(samples: list[float]) -> float:
    """Relative spread (max − min) / median: how noisy a case was."""
    m = statistics.median(samples)
    return (max(samples) - min(samples)) / m if m else 0.0


# ---------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False if unsupported.

    Freed memory the allocator keeps cached still counts as resident, so peaks measured after a
    reset are only comparable between cases that run in a fresh process (see `run_isolated`).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_peak_rss_bytes() -> int:
    """VmHWM (peak since the last reset) from /proc/self/status, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def run_isolated(argv: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run `python argv...` in a fresh process and parse the JSON object on its last stdout line.

    A fresh process is the only honest way to compare peak memory of two cases on CPU: the
    allocator does not return freed pages, so a case run after a bigger one would look free.
    Blocks of 64 KiB and more are mapped and unmapped directly in the child, so its resident size
    follows the tensors alive rather than the allocator's cache.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"isolated run {argv} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- memory bandwidth
def memory_bandwidth(mbytes: int = 256, rounds: int = 7, clock: str = "wall") -> dict[str, float]:
    """Sustained DRAM bandwidth in bytes/s: a read-only pass (sum) and a copy (read + write).

    The buffer is much larger than the last-level cache so the numbers are DRAM, not cache.
    Uses torch's own threads, like the kernels being bounded.
    """
    n = mbytes * 2**20 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    times = interleaved(
        {"read": lambda: src.sum(), "copy": lambda: dst.copy_(src)},
        rounds=rounds,
        warmup=1,
        clock=clock,
    )
    nbytes = n * 4
    return {
        "read_Bps": nbytes / min(times["read"]),
        "copy_Bps": 2 * nbytes / min(times["copy"]),  # bytes read + bytes written
        "buffer_bytes": float(nbytes),
    }


# ---------------------------------------------------------------------- output
def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write results (creating the directory); returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b:.1f} GiB"
