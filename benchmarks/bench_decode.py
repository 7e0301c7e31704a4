"""Per-token decode latency against context length: full re-computation vs the state.

    python benchmarks/bench_decode.py            # small preset, contexts 64 … 4096
    python benchmarks/bench_decode.py --quick    # contexts 64, 256, 1024, fewer rounds

For each context c it times, interleaved in one run and repeated over rounds:
- full:  one forward pass over the whole c-token prefix for the next token (what the reference's
         `generate` does for every token; our forward, so the fastest exact full pass we have);
- state: one `model.step` of a single token from a state prefilled to c tokens.
Prints the configuration, a machine line, medians and median ratios; writes JSON.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bdh import BDH, BDHConfig
from common import (
    RESULTS,
    ensure_quiet_threads,
    fmt_seconds,
    interleaved,
    machine_info,
    machine_line,
    median,
    median_ratio,
    write_json,
)

CONTEXTS = (64, 128, 256, 512, 1024, 2048, 4096)
QUICK_CONTEXTS = (64, 256, 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="config preset (default: small)")
    p.add_argument("--contexts", type=lambda s: [int(c) for c in s.split(",")], default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per state sample")
    p.add_argument("--max-full", type=int, default=4096, help="longest context for full")
    p.add_argument("--quick", action="store_true", help="3 contexts, 3 rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_decode.json")
    args = p.parse_args(argv)
    if args.contexts is None:
        args.contexts = list(QUICK_CONTEXTS if args.quick else CONTEXTS)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    return args


def build_model(preset: str, seed: int) -> BDH:
    torch.manual_seed(seed)
    return BDH(BDHConfig.from_name(preset)).eval()


def full_case(model: BDH, prefix: torch.Tensor) -> Callable[[], Any]:
    """The reference's per-token cost: the whole prefix through the model for one new token."""

    def run() -> Any:
        with torch.no_grad():
            return model(prefix)[0][:, -1]

    return run


def state_case(model: BDH, prefix: torch.Tensor) -> Callable[[], Any]:
    """One recurrent step from a state that has already read the prefix (prefilled once here)."""
    state = model.init_state(1)
    with torch.no_grad():
        logits, _ = model.step(prefix, state)
    token = logits[:, -1:].argmax(-1)  # (1, 1)

    def run() -> Any:
        with torch.no_grad():
            return model.step(token, state)[0]

    return run


def measure(model: BDH, args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    g = torch.Generator().manual_seed(args.seed)
    V = model.config.vocab_size
    cases: dict[str, Callable[[], Any]] = {}
    inner: dict[str, int] = {}
    for c in args.contexts:
        prefix = torch.randint(0, V, (1, c), generator=g)
        cases[f"state@{c}"] = state_case(model, prefix)
        inner[f"state@{c}"] = args.steps
        if c <= args.max_full:
            cases[f"full@{c}"] = full_case(model, prefix)
    times = interleaved(cases, rounds=args.rounds, warmup=1, inner=inner)
    by_ctx: dict[int, dict[str, list[float]]] = {c: {} for c in args.contexts}
    for name, samples in times.items():
        method, c = name.split("@")
        by_ctx[int(c)][method] = samples
    return by_ctx


def summarise(by_ctx: dict[int, dict[str, list[float]]]) -> list[dict[str, Any]]:
    base = min(by_ctx)
    rows = []
    for c, m in sorted(by_ctx.items()):
        row: dict[str, Any] = {"context": c, "state_s": median(m["state"])}
        row["state_vs_shortest"] = median_ratio(m["state"], by_ctx[base]["state"])
        if "full" in m:
            row["full_s"] = median(m["full"])
            row["full_over_state"] = median_ratio(m["full"], m["state"])
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], base: int) -> None:
    head = f"state/state@{base}"
    print(f"{'context':>8} {'full':>10} {'state':>10} {'full/state':>11} {head:>16}")
    for r in rows:
        full = fmt_seconds(r["full_s"]) if "full_s" in r else "-"
        ratio = f"{r['full_over_state']:.0f}x" if "full_over_state" in r else "-"
        print(
            f"{r['context']:>8} {full:>10} {fmt_seconds(r['state_s']):>10} {ratio:>11}"
            f" {r['state_vs_shortest']:>15.2f}x"
        )


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 2, must show 3: flat state latency and the gap to full re-computation."""
    by_c = {r["context"]: r for r in rows}
    out: dict[str, Any] = {}
    if 64 in by_c and 4096 in by_c:
        ratio = by_c[4096]["state_vs_shortest"] if min(by_c) == 64 else None
        ratio = ratio or by_c[4096]["state_s"] / by_c[64]["state_s"]
        out["state_4096_over_64"] = {"value": ratio, "target": "<= 1.5", "met": ratio <= 1.5}
    if 1024 in by_c and "full_over_state" in by_c[1024]:
        speedup = by_c[1024]["full_over_state"]
        out["speedup_at_1024"] = {"value": speedup, "target": ">= 50", "met": speedup >= 50}
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_quiet_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.seed)
    cfg = model.config
    info = machine_info()
    print(
        f"config: preset={args.preset} L={cfg.n_layer} D={cfg.n_embd} nh={cfg.n_head} N={cfg.N}"
        f" n={cfg.n} params={model.num_params():,} attention={cfg.attention}"
        f" chunk={cfg.chunk_size} batch=1 float32 random weights"
    )
    print(machine_line(info))
    print(f"rounds={args.rounds} (+1 warm-up), state sample = {args.steps} steps; medians\n")
    by_ctx = measure(model, args)
    rows = summarise(by_ctx)
    print_table(rows, min(args.contexts))
    checks = verdicts(rows)
    for name, v in checks.items():
        print(f"{name}: {v['value']:.2f} (target {v['target']}) {'MET' if v['met'] else 'NOT MET'}")
    payload = {
        "benchmark": "bench_decode",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "config": cfg.to_dict(),
        "machine": info,
        "rows": rows,
        "samples": {str(c): m for c, m in by_ctx.items()},
        "checks": checks,
    }
    print(f"\nwrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
