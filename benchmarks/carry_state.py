"""Training with the state carried across batches (paper App. B) against plain training.

    python benchmarks/carry_state.py                 # small preset, Shakespeare, 1000 steps each
    python benchmarks/carry_state.py --steps 200     # a shorter comparison

Three runs of `bdh train` on the same data for the same number of tokens (same batch, block,
schedule and seed):

- `random`: random offsets, every batch from an empty state (the reference's way, our default);
- `stream`: temporally coherent streams, every batch still from an empty state;
- `carry`:  the same streams, each batch starting from the state the previous one left, detached
            at batch boundaries (truncated BPTT), reset when the streams wrap (`--carry-state`).

Each checkpoint is scored on the whole validation split two ways: `windows`, consecutive blocks
of block_size tokens each read from an empty state (what `bdh eval` reports), and `stream`, the
split read as 8 continuous lanes with the state carried from block to block, so every token sees
all the text before it in its lane. Results go to benchmarks/results/carry_state.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import common
from bdh import data as bdh_data
from bdh.checkpoint import load_checkpoint
from bdh.train import TrainConfig, evaluate, train

# ALiBi-like per-head decay of the state (SPEC §3 damping): λ_h = exp(−2^(−2h−2)), i.e. memories
# fading over ~4, 16, 64 and 256 tokens. Without it a state carried through a stream of 10^5
# tokens sums them all with equal weight, and training stalls (measured: see the README table).
DAMPING = [0.7788, 0.9394, 0.9845, 0.9961]
UNDAMPED = {"damping": None}  # the presets damp by default; these three runs are without
RUNS: dict[str, dict[str, Any]] = {
    "random": {"batches": "random", "model": UNDAMPED},
    "stream": {"batches": "stream", "model": UNDAMPED},
    "carry": {"batches": "stream", "carry_state": True, "model": UNDAMPED},
    "random+damping": {"batches": "random", "model": {"damping": DAMPING}},
    "carry+damping": {"batches": "stream", "carry_state": True, "model": {"damping": DAMPING}},
}


@torch.no_grad()
def evaluate_stream(model: Any, tokens: np.ndarray, block: int, lanes: int = 8) -> dict[str, float]:
    """Nats per token over `lanes` continuous lanes of the tokens, the state carried throughout."""
    model.eval()
    lane = (len(tokens) - 1) // lanes
    ids = torch.from_numpy(np.asarray(tokens[: lanes * lane + 1], dtype=np.int64))
    starts = torch.arange(lanes) * lane
    state = model.init_state(lanes)
    nats, count = 0.0, 0
    for pos in range(0, lane, block):
        t = min(block, lane - pos)
        cols = starts[:, None] + pos + torch.arange(t + 1)  # (lanes, t + 1)
        rows = ids[cols]
        logits, _ = model(rows[:, :-1], state=state)  # advances the state
        nats += float(
            F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")
        )
        count += rows[:, 1:].numel()
    return {"loss": nats / count, "bpb": nats / count / math.log(2), "tokens": count}


def run_config(args: argparse.Namespace, name: str) -> TrainConfig:
    options = dict(RUNS[name])
    model_fields = options.pop("model", None)
    if model_fields is not None:  # model options go through a config file, as on the CLI
        path = Path(args.out) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(model_fields))
        options["config_file"] = str(path)
    return TrainConfig(
        data=args.data, out=str(Path(args.out) / name), preset=args.preset, max_steps=args.steps,
        batch_size=args.batch_size, block_size=args.block_size, lr=args.lr, warmup_steps=20,
        eval_interval=max(1, args.steps // 5), ckpt_interval=args.steps, seed=args.seed,
        threads=args.threads, **options,
    )  # fmt: skip


def main() -> None:
    args = parse_args()
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "json"}  # no paths of this machine
    results: dict[str, Any] = {"machine": info, "settings": settings, "runs": {}}
    if Path(args.json).is_file():  # keep the runs measured before (--runs picks a subset)
        results["runs"] = json.loads(Path(args.json).read_text()).get("runs", {})
    for name in args.runs:
        cfg = run_config(args, name)
        start = time.perf_counter()
        if not (Path(cfg.out) / "checkpoint").is_dir() or args.retrain:
            train(cfg, progress=False, log=lambda line: None)
        seconds = time.perf_counter() - start
        ckpt = load_checkpoint(cfg.out)
        corpus = bdh_data.load_corpus(cfg.data)
        val = bdh_data.tokenize_cached(corpus.val, ckpt.tokenizer)
        windows = evaluate(ckpt.model, val, ckpt.tokenizer.bytes_per_token, cfg.block_size)
        stream = evaluate_stream(ckpt.model, val, cfg.block_size)
        tokens = cfg.max_steps * cfg.batch_size * cfg.block_size * cfg.grad_accum
        results["runs"][name] = {
            "train_tokens": tokens,
            "train_seconds": seconds,
            "val_windows": windows.to_dict(),
            "val_stream": stream,
            "options": RUNS[name],
        }
        print(
            f"{name:7s} {tokens:,} tokens: val loss windows {windows.loss:.4f}"
            f" ({windows.bpb:.3f} bpb), stream {stream['loss']:.4f} ({stream['bpb']:.3f} bpb)",
            flush=True,
        )
        common.write_json(args.json, results)
    print(table(results))


def table(results: dict[str, Any]) -> str:
    head = "| run | train tokens | val loss, blocks from an empty state (bpb) |"
    lines = [head + " val loss, state carried (bpb) |", "|---|---|---|---|"]
    for name, r in results["runs"].items():
        w, s = r["val_windows"], r["val_stream"]
        lines.append(
            f"| {name} | {r['train_tokens']:,} | {w['loss']:.4f} ({w['bpb']:.3f}) |"
            f" {s['loss']:.4f} ({s['bpb']:.3f}) |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS))
    ap.add_argument("--out", default="runs/carry_state")
    ap.add_argument(
        "--retrain", action="store_true", help="train again even if a checkpoint exists"
    )
    ap.add_argument("--json", default=str(common.RESULTS / "carry_state.json"))
    return ap.parse_args()


if __name__ == "__main__":
    main()
