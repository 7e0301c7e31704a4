"""Training throughput and memory: our default path against SPEC §2 written literally.

    python benchmarks/bench_train.py --quick          # small preset, T = 512, B = 1 and 4 (~5 min)
    python benchmarks/bench_train.py                  # small and reference, T = 256..2048, B = 1, 4
    python benchmarks/bench_train.py --compile        # add compiled-vs-compiled cells
    python benchmarks/bench_train.py --bf16           # add our path under bf16 autocast

Every cell (preset, B, T) times one training step (zero_grad, forward, backward, AdamW) of each
case on the same weights and batch, plus a square fp32 matmul that measures this machine's matmul
rate, interleaved in rotating order and repeated, so the shared CPU's load hits every case alike:

- `literal`:        `bdh.reference.ReferenceBDH` (SPEC §2 as written);
- `ours`:           `bdh.BDH`'s default training path;
- `ours+recompute`: with per-layer recomputation (only where `ours` would not fit --max-gb);
- `literal/glibc`:  the literal formulation with glibc's default allocator, the only case whose
                    process differs: it shows the allocator setting's own effect, never a ratio
                    of ours.

`literal` and `ours` run under the same process settings: freed memory retained by the allocator
as our trainer does (`bdh.speed.retain_freed_memory`) and torch's thread count, which every worker
reports and the cell checks. "ours / literal" is therefore the formulation alone.

Each case lives in its own worker process (so each has its own allocator setting); the
coordinator asks them for one step at a time. Reported: medians, the median of per-round ratios,
and the fraction of the matmul rate reached counting only the FLOPs the causal computation needs
(the masked upper triangle is not work). Before timing, the eval-mode losses of all cases on the
same sequence must agree to 1e-5.

Peak memory is measured in a fresh process per case (one training step; peak resident set above
the process's size before the step, glibc defaults), since an allocator keeps freed pages and a
second case in the same process would look free. Absolute times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import bdh
import common  # the benchmarks' shared helpers, beside this script
from bdh import BDH, BDHConfig
from bdh.ops.common import cheapest_form
from bdh.reference import ReferenceBDH
from bdh.speed import autocast, retain_freed_memory

PROBE_N = 2048  # the square fp32 matmul that measures the machine's rate in every round


# ---------------------------------------------------------------------------- FLOPs
def needed_flops(cfg: BDHConfig, B: int, T: int, path: str) -> float:
    """FLOPs of one forward + backward that the causal computation needs (no masked work).

    Per layer and sequence: the three n×D products, forward and two backward, 18·D·n per token;
    the attention's τ < t pairs, 3·T(T−1)·(N + D) per head (scores and values forward, their
    gradients, and the query and key roles of Q backward). Our path above the chunked crossover
    runs the chunked algorithm instead: masked pairs inside chunks of C plus 12·N·D per token and
    head for writing and reading the state; that is what it needs, so that is what it is
    credited with.
    """
    D, n, nh, N, V, L = cfg.n_embd, cfg.n, cfg.n_head, cfg.N, cfg.vocab_size, cfg.n_layer
    proj = 18 * D * n * T
    if path.startswith("ours") and cheapest_form(T, N, D, cfg.chunk_size) == "chunked":
        full, rest = divmod(T, cfg.chunk_size)
        inside = full * cfg.chunk_size * (cfg.chunk_size - 1) + rest * (rest - 1)
        attn = nh * (3 * inside * (N + D) + 12 * N * D * T)
    else:
        attn = nh * 3 * T * (T - 1) * (N + D)
    return float(B * (L * (proj + attn) + 6 * D * V * T))


def estimated_bytes(cfg: BDHConfig, B: int, T: int, path: str) -> float:
    """A rough peak-memory estimate, to skip cells that would not fit (measured ones are exact)."""
    n, nh, L = cfg.n, cfg.n_head, cfg.n_layer
    wide = B * n * T * 4  # one (B, nh, T, N) float32 tensor
    square = B * nh * T * T * 4
    if path.startswith("literal"):
        return L * (7 * wide + 3 * square) + 2 * wide
    if path.startswith("ours+recompute"):
        return 6 * wide + 2 * square
    chunked = cheapest_form(T, cfg.N, cfg.n_embd, cfg.chunk_size) == "chunked"
    return L * (5 * wide + (wide * cfg.n_embd // cfg.chunk_size if chunked else square)) + wide


# ---------------------------------------------------------------------------- models
def build(preset: str, path: str, seed: int = 0) -> torch.nn.Module:
    """The model of a case: the literal module or ours, the same weights for a given seed."""
    torch.manual_seed(seed)
    cfg = BDHConfig.from_name(preset, damping=None)  # the literal module has no damping
    ours = BDH(cfg)
    if path.startswith("literal"):
        model: torch.nn.Module = ReferenceBDH(cfg)
        model.load_state_dict(ours.state_dict())
    else:
        model = ours
        ours.recompute = "recompute" in path
    return model.train()


def batch(B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


class Trainer:
    """One model with its optimizer; `step()` is one training step on a fixed batch."""

    def __init__(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool
    ) -> None:
        self.model, self.x, self.y = model, x, y
        self.precision = "bf16" if bf16 else "fp32"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.precision):
            _, loss = self.model(self.x, self.y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


@torch.no_grad()
def eval_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    _, loss = model(x, y)
    model.train(was)
    return float(loss)


def matmul_probe() -> Any:
    a, b = torch.randn(PROBE_N, PROBE_N), torch.randn(PROBE_N, PROBE_N)
    out = torch.empty(PROBE_N, PROBE_N)
    return lambda: torch.mm(a, b, out=out)


PROBE_FLOPS = 2.0 * PROBE_N**3


# ---------------------------------------------------------------------------- one cell
class Worker:
    """A case in its own process: builds its model, then runs one training step per request."""

    def __init__(self, preset: str, path: str, B: int, T: int, compiled: bool) -> None:
        argv = [sys.executable, __file__, "--worker", preset, path, str(B), str(T), str(compiled)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._reply()  # {"eval_loss": ..., "compile_seconds": ...}

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3:]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def step(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._reply()["loss"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


GLIBC_DEFAULT = "literal/glibc"  # the one case that keeps glibc's default allocator


def worker_main(preset: str, path: str, B: int, T: int, compiled: bool) -> None:
    """The worker's side: allocator as the case says, model, same-loss check, then steps."""
    retained = path != GLIBC_DEFAULT and retain_freed_memory()
    model = build(preset, path)
    x, y = batch(B, T)
    start = time.perf_counter()
    if compiled:
        model.compile()
    # Compiled cases are checked as compiled: the same-loss check runs through the compiled model.
    ready: dict[str, Any] = {"eval_loss": eval_loss(model, x[:1], y[:1])}
    ready["process"] = {"retained_freed_memory": retained, "threads": torch.get_num_threads()}
    trainer = Trainer(model, x, y, bf16=path.endswith("+bf16"))
    if compiled:
        trainer.step()  # compiles forward and backward
        ready["compile_seconds"] = time.perf_counter() - start
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(json.dumps({"loss": trainer.step()}), flush=True)


def freeze_source(root: Path) -> tuple[Path, str]:
    """Copy the committed package (git HEAD; else the imported one) into `root` for the workers,
    so that a file edited in the tree during a long run neither breaks nor changes the cells
    after it."""
    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", "src/bdh"],
                             capture_output=True, check=False)  # fmt: skip
    if head and archive.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
        return root / "src", f"git {head}"
    shutil.copytree(Path(bdh.__file__).parent, root / "bdh")
    return root, "working tree"


def time_cell(
    preset: str, B: int, T: int, paths: list[str], rounds: int, compiled: bool = False
) -> dict[str, Any]:
    """Interleaved step times of `paths` (+ the matmul probe) at one (preset, B, T)."""
    cfg = BDHConfig.from_name(preset)
    workers = {p: Worker(preset, p, B, T, compiled) for p in paths}
    try:
        cases = {p: w.step for p, w in workers.items()} | {"matmul": matmul_probe()}
        times = common.interleaved(cases, rounds=rounds, warmup=1)
    finally:
        for w in workers.values():
            w.close()
    process = {p: w.ready["process"] for p, w in workers.items()}
    same_process(process)
    losses = {p: w.ready["eval_loss"] for p, w in workers.items() if not p.endswith("+bf16")}
    spread = max(losses.values()) - min(losses.values())
    cell: dict[str, Any] = {"preset": preset, "B": B, "T": T, "rounds": rounds}
    cell |= {"eval_losses": losses, "loss_abs_diff": spread, "same_loss_1e-5": spread <= 1e-5}
    cell["compiled"] = compiled
    cell["process"] = process
    if compiled:
        cell["compile_seconds"] = {p: w.ready["compile_seconds"] for p, w in workers.items()}
    rate = [PROBE_FLOPS / t for t in times["matmul"]]
    cell["matmul_GFLOPs"] = common.median(rate) / 1e9
    for p in paths:
        flops = needed_flops(cfg, B, T, p)
        cell[p] = {
            "seconds": common.median(times[p]),
            "spread": common.spread(times[p]),
            "tokens_per_s": B * T / common.median(times[p]),
            "needed_GFLOP": flops / 1e9,
            "matmul_fraction": common.median(
                [flops / t / r for t, r in zip(times[p], rate, strict=True)]
            ),
        }
        if p.startswith("ours") and "literal" in times:
            cell[p]["speedup_vs_literal"] = common.median_ratio(times["literal"], times[p])
    if GLIBC_DEFAULT in times and "literal" in times:
        # How much slower the same formulation runs with glibc's default allocator.
        cell["allocator_effect_on_literal"] = common.median_ratio(
            times[GLIBC_DEFAULT], times["literal"]
        )
    return cell


def same_process(process: dict[str, dict[str, Any]]) -> None:
    """Every case but `literal/glibc` runs with the same allocator setting and thread count."""
    threads = {p: s["threads"] for p, s in process.items()}
    if len(set(threads.values())) != 1:
        raise RuntimeError(f"workers run different thread counts: {threads}")
    retained = {p: s["retained_freed_memory"] for p, s in process.items() if p != GLIBC_DEFAULT}
    if len(set(retained.values())) > 1:
        raise RuntimeError(f"workers run different allocator settings: {retained}")


# ---------------------------------------------------------------------------- memory
def memory_probe(preset: str, path: str, B: int, T: int, accum: int = 1) -> dict[str, Any]:
    """In a fresh process: peak RSS of `accum` forward/backward passes + one AdamW step."""
    model = build(preset, path)
    x, y = batch(B, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gc.collect()
    before = common.current_peak_rss_bytes()
    common.reset_peak_rss()
    base = _rss_bytes()
    start = time.perf_counter()
    for _ in range(accum):
        _, loss = model(x, y)
        (loss / accum).backward()
    opt.step()
    return {
        "preset": preset,
        "path": path,
        "B": B,
        "T": T,
        "accum": accum,
        "step_peak_bytes": common.current_peak_rss_bytes() - base,
        "process_peak_bytes": max(before, common.current_peak_rss_bytes()),
        "seconds": time.perf_counter() - start,
    }


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return common.peak_rss_bytes()


def measure_memory(preset: str, path: str, B: int, T: int, accum: int = 1) -> dict[str, Any]:
    argv = [__file__, "--memory-probe", preset, path, str(B), str(T), str(accum)]
    return common.run_isolated(argv, timeout=7200)


# ---------------------------------------------------------------------------- the run
def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    if args.quick:
        return [("small", B, 512) for B in (1, 4)]
    return [(p, B, T) for p in args.presets for T in args.T for B in args.B]


def runnable(
    preset: str, B: int, T: int, budget: float, bf16: bool, glibc: bool = True
) -> tuple[list[str], dict[str, str]]:
    """The cases that fit the memory budget together (workers run side by side; the retained
    ones keep their peak resident), in order of importance; the others with the reason."""
    cfg = BDHConfig.from_name(preset)
    ours = "ours" if estimated_bytes(cfg, B, T, "ours") <= budget else "ours+recompute"
    wanted = (
        [ours, "literal"] + ([GLIBC_DEFAULT] if glibc else []) + (["ours+bf16"] if bf16 else [])
    )
    paths, skipped, total = [], {}, 0.0
    for p in wanted:
        need = estimated_bytes(cfg, B, T, p)
        if total + need > budget:
            skipped[p] = (
                f"estimated {common.fmt_bytes(need)} does not fit {common.fmt_bytes(budget)}"
            )
        else:
            paths.append(p)
            total += need
    if ours != "ours":
        skipped["ours"] = "estimated above the budget; timed with recomputation instead"
    return paths, skipped


def rounds_for(preset: str, B: int, T: int, paths: list[str], args: argparse.Namespace) -> int:
    """Fewer rounds for the cells whose steps take minutes, so the whole grid ends in hours."""
    cfg = BDHConfig.from_name(preset)
    work = sum(needed_flops(cfg, B, T, p) for p in paths) / 30e9  # seconds at ~30 GFLOP/s
    return max(1, min(args.rounds, int(args.cell_seconds // max(work, 1e-9))))


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        preset, path, B, T, accum = args.memory_probe
        print(json.dumps(memory_probe(preset, path, int(B), int(T), int(accum))))
        return
    if args.worker:
        preset, path, B, T, compiled = args.worker
        worker_main(preset, path, int(B), int(T), compiled == "True")
        return
    common.ensure_quiet_threads()
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_src_") as frozen:
        source, code = freeze_source(Path(frozen))  # every child process imports this copy
        os.environ["PYTHONPATH"] = os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])
        print(f"code: {code}, frozen for the worker processes in {source}", flush=True)
        run(args, info, code)


def run(args: argparse.Namespace, info: dict[str, Any], code: str) -> None:
    """The timed grid, the compiled cells and the memory probes, written to `args.out`."""
    results: dict[str, Any] = {"machine": info, "code": code, "argv": sys.argv[1:]}
    results["presets"] = {p: BDHConfig.from_name(p).to_dict() for p in args.presets}
    results["cells"] = []
    budget = args.max_gb * 2**30
    for preset, B, T in plan(args):
        paths, skipped = runnable(preset, B, T, budget, args.bf16, not args.no_glibc_case)
        rounds = rounds_for(preset, B, T, paths, args)
        cell = time_cell(preset, B, T, paths, rounds)
        cell["skipped"] = skipped
        results["cells"].append(cell)
        print(row(cell), flush=True)
        common.write_json(args.out, results)  # a long run keeps what it measured so far
    if args.compile:
        results["compiled"] = []
        grid = [("small", 4, 512), ("reference", 1, 512)][: 1 if args.quick else 2]
        for preset, B, T in [cell for cell in grid if cell[0] in args.presets]:
            paths = ["literal", GLIBC_DEFAULT, "ours"]
            cell = time_cell(preset, B, T, paths, args.rounds, compiled=True)
            results["compiled"].append(cell)
            print("compiled " + row(cell), flush=True)
            common.write_json(args.out, results)
    if not args.no_memory:
        results["memory"] = memory_cells(args)
    out = common.write_json(args.out, results)
    print(f"wrote {out}")


def memory_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak memory: literal vs ours vs ours+recompute at B = 1, and the 25M at batch 32."""
    cells = []
    budget = args.max_gb * 2**30
    grid = (
        [("small", 1, 512)]
        if args.quick
        else [(p, 1, T) for p in args.presets for T in (512, 2048)]
    )
    for preset, B, T in grid:
        cfg = BDHConfig.from_name(preset)
        for path in ("literal", "ours", "ours+recompute"):
            if estimated_bytes(cfg, B, T, path) > budget:
                cells.append({"preset": preset, "path": path, "B": B, "T": T, "skipped": True})
                continue
            cells.append(measure_memory(preset, path, B, T))
            print(mem_row(cells[-1]), flush=True)
    if not args.quick and "reference" in args.presets:
        # The 25M model at T = 512 with an effective batch of 32 sequences (8 x 4 accumulated).
        cells.append(measure_memory("reference", "ours+recompute", 8, 512, accum=4))
        print(mem_row(cells[-1]), flush=True)
    return cells


def row(cell: dict[str, Any]) -> str:
    head = f"{cell['preset']:9s} B={cell['B']} T={cell['T']:4d}"
    parts = [head, f"matmul {cell['matmul_GFLOPs']:.0f} GFLOP/s"]
    for p in ("literal", GLIBC_DEFAULT, "ours", "ours+recompute", "ours+bf16"):
        if p in cell:
            c = cell[p]
            text = f"{p} {c['tokens_per_s']:.0f} tok/s ({c['matmul_fraction']:.0%})"
            if "speedup_vs_literal" in c:
                text += f" x{c['speedup_vs_literal']:.2f}"
            parts.append(text)
    if "allocator_effect_on_literal" in cell:
        parts.append(f"glibc allocator slows literal x{cell['allocator_effect_on_literal']:.2f}")
    parts.append(f"|Δloss| {cell['loss_abs_diff']:.1e}, {cell['rounds']} rounds")
    if cell.get("skipped"):
        parts.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in cell["skipped"].items()))
    return " | ".join(parts)


def mem_row(m: dict[str, Any]) -> str:
    batch_text = f"B={m['B']}" + (f"x{m['accum']}" if m.get("accum", 1) > 1 else "")
    return (
        f"memory {m['preset']:9s} {batch_text} T={m['T']:4d} {m['path']:15s} step peak "
        f"{common.fmt_bytes(m['step_peak_bytes'])}, process peak "
        f"{common.fmt_bytes(m['process_peak_bytes'])}"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset, T=512, B=1 and 4")
    ap.add_argument("--presets", type=lambda s: s.split(","), default=["small", "reference"])
    ap.add_argument(
        "--T", type=lambda s: [int(t) for t in s.split(",")], default=[256, 512, 1024, 2048]
    )
    ap.add_argument("--B", type=lambda s: [int(b) for b in s.split(",")], default=[1, 4])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per cell (at most)")
    ap.add_argument("--cell-seconds", type=float, default=900, help="time budget per cell")
    ap.add_argument("--max-gb", type=float, default=10.0, help="skip cases estimated above this")
    ap.add_argument("--compile", action="store_true", help="add compiled-vs-compiled cells")
    ap.add_argument("--bf16", action="store_true", help="add our path under bf16 autocast")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument(
        "--no-glibc-case",
        action="store_true",
        help="skip the allocator's own effect (literal/glibc)",
    )
    ap.add_argument("--out", default=str(common.RESULTS / "bench_train.json"))
    ap.add_argument("--memory-probe", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    return ap.parse_args()


if __name__ == "__main__":
    main()
