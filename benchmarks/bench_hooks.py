"""The cost of the named activation points when no hook is set: this code against the code before.

    python benchmarks/bench_hooks.py                          # small preset, random weights
    python benchmarks/bench_hooks.py --checkpoint runs/quickstart --threads 1 --clock cpu
    python benchmarks/bench_hooks.py --old <git ref>          # the code to compare against

The package as it was at `--old` (default: where this branch left `main`) is exported from git into
a temporary directory and imported as `bdh_old`, beside the current `bdh`, in this one process.
Both models hold the same weights; every case runs old and new alternately, round after round,
and the result is the median over rounds of old time / new time (≥ 1: the new code is no slower).

Cases: a training step (forward + backward, dropout on), a scoring forward, a prompt read into a
state (prefill), and one-token decoding steps from the state (dense and sparse-active paths,
`bench_decode`'s) and from a key-value cache. Also, for information, the cost of recording every
point with `run_with_cache` against a plain forward.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bdh.decode as new_decode
import bdh.interpret as interpret
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
    spread,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="config preset (default: small)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a `bdh train` run or checkpoint")
    p.add_argument("--old", default=None, help="git ref of the old code (default: merge-base main)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--context", type=int, default=256, help="context of the decoding steps")
    p.add_argument("--steps", type=int, default=8, help="decoding steps per sample")
    p.add_argument("--batch", type=int, default=8, help="training batch (B x 64 tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see bench_decode")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_hooks.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- the old code
def old_ref(ref: str | None) -> str:
    """The commit to compare against, resolved to its hash."""
    ref = ref or _git("merge-base", "HEAD", "main")
    return _git("rev-parse", ref)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def import_old(commit: str, into: Path) -> Any:
    """`src/bdh` at `commit`, written to `into/bdh_old` with its imports renamed, imported."""
    archive = subprocess.run(
        ["git", "archive", commit, "src/bdh"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / "bdh_old"
    (into / "src" / "bdh").rename(package)
    for path in package.rglob("*.py"):
        text = re.sub(r"\b(from|import) bdh\b", r"\1 bdh_old", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("bdh_old")


# ---------------------------------------------------------------------- models and cases
def load_models(args: argparse.Namespace, old: Any) -> tuple[BDH, Any, str]:
    if args.checkpoint is not None:
        from bdh.checkpoint import load_checkpoint

        new = load_checkpoint(args.checkpoint).model
        origin = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(0)
        new = BDH(BDHConfig.from_name(args.preset))
        origin = f"preset {args.preset}, random weights"
    old_model = old.BDH(old.BDHConfig.from_dict(new.config.to_dict()))
    old_model.load_state_dict(new.state_dict())
    return new, old_model, origin


def cases(model: Any, decode: Any, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """The timed calls of one model (old or new), each on fresh inputs of a fixed seed."""
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    batch = torch.randint(0, V, (args.batch, 65), generator=g)
    scoring = torch.randint(0, V, (4, 256), generator=g)
    prompt = torch.randint(0, V, (1, args.context), generator=g)
    tokens = torch.randint(0, V, (1, args.steps), generator=g)
    out: dict[str, Callable[[], Any]] = {}

    def train() -> None:
        model.train()
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(scoring)

    out["train step"] = train
    out["forward"] = forward
    paths = {
        "prefill": (decode.DecodeOptions(kv="off"), None),
        "step dense": (decode.DecodeOptions(kv="off", attention="dense", y_path="dense"), None),
        "step sparse": (decode.DecodeOptions(kv="off", attention="sparse", y_path="sparse"), None),
        "step kv": (decode.DecodeOptions(kv="on", attention="sparse", y_path="sparse"), 64),
    }
    for name, (options, context) in paths.items():
        out[name] = _decoding(model, options, prompt[:, :context], tokens, name == "prefill")
    return out


def _decoding(model: Any, options: Any, prompt: torch.Tensor, tokens: torch.Tensor, prefill: bool):
    """A call that reads `prompt` (prefill) or decodes `tokens` one by one after it."""
    engine = model.decoding_engine(options)
    state = engine.init_state(1)
    if prefill:
        return lambda: engine.step(prompt, engine.init_state(1))
    engine.step(prompt, state)

    def steps() -> None:
        s = state.clone()
        for t in range(tokens.shape[1]):
            engine.step(tokens[:, t : t + 1], s)

    return steps


# ---------------------------------------------------------------------- checks
def same_outputs(new: BDH, old: Any, args: argparse.Namespace) -> dict[str, float]:
    """Largest difference of the logits, old against new, per path (0 = bit-identical)."""
    idx = torch.randint(
        0, new.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1)
    )
    diffs = {}
    with torch.no_grad():
        diffs["forward"] = float((new(idx)[0] - old(idx)[0]).abs().max())
        for kv in ("off", "on"):
            logits = []
            for model, mod in (
                (new, new_decode),
                (old, sys.modules["bdh_old.decode"]),
            ):
                engine = model.decoding_engine(mod.DecodeOptions(kv=kv))
                state = engine.init_state(2)
                pieces = [engine.step(idx[:, :40], state)]
                pieces += [engine.step(idx[:, t : t + 1], state) for t in range(40, 96)]
                logits.append(torch.cat(pieces, 1))
            diffs[f"decode kv={kv}"] = float((logits[0] - logits[1]).abs().max())
    return diffs


def capture_cost(model: BDH, rounds: int, clock: str) -> dict[str, float]:
    """Information: a forward that records every point, against a plain one (same process)."""
    idx = torch.randint(
        0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(2)
    )

    def plain() -> None:
        with torch.no_grad():
            model(idx)

    def cached() -> None:
        with torch.no_grad():
            model.run_with_cache(idx)

    times = interleaved({"plain": plain, "cached": cached}, rounds, clock=clock)
    return {
        "plain_s": median(times["plain"]),
        "cached_s": median(times["cached"]),
        "cached_over_plain": median_ratio(times["cached"], times["plain"]),
    }


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ensure_quiet_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = old_ref(args.old)
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(commit, Path(tmp))
        new, old_model, origin = load_models(args, old)
        new.eval(), old_model.eval()
        c = new.config
        info = machine_info()
        print(
            f"config: {origin} L={c.n_layer} D={c.n_embd} nh={c.n_head} N={c.N} "
            f"train batch {args.batch}x64, forward 4x256, decoding context {args.context} "
            f"x {args.steps} steps, {args.rounds} rounds, clock {args.clock}; "
            f"old code {commit[:12]}"
        )
        print(machine_line(info))
        diffs = same_outputs(new, old_model, args)
        print(
            "old vs new logits, max |difference|: "
            + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        )
        new_cases = cases(new, new_decode, args)
        old_cases = cases(old_model, sys.modules["bdh_old.decode"], args)
        timed = {
            f"{side} {name}": fn
            for name in new_cases
            for side, fn in (("old", old_cases[name]), ("new", new_cases[name]))
        }
        times = interleaved(timed, args.rounds, clock=args.clock)
        rows = []
        for name in new_cases:
            o, n = times[f"old {name}"], times[f"new {name}"]
            rows.append(
                {
                    "case": name,
                    "old_s": median(o),
                    "new_s": median(n),
                    "old_over_new": median_ratio(o, n),
                    "spread_old": spread(o),
                    "spread_new": spread(n),
                }
            )
        print("\n| case | old | new | old / new (median of rounds) |\n|---|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['case']} | {fmt_seconds(r['old_s'])} | {fmt_seconds(r['new_s'])} "
                f"| {r['old_over_new']:.3f} |"
            )
        cost = capture_cost(new, max(5, args.rounds // 3), args.clock)
        print(
            f"\nrecording all {len(interpret.hook_names(new))} points with run_with_cache: "
            f"{cost['cached_over_plain']:.2f}x a plain forward (information)"
        )
    payload = {
        "config": c.to_dict(),
        "origin": origin,
        "old_commit": commit,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": info,
        "max_logit_difference": diffs,
        "cases": rows,
        "capture_cost": cost,
        "min_old_over_new": min(r["old_over_new"] for r in rows),
    }
    print(f"wrote {write_json(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
