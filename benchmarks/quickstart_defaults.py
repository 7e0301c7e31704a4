"""The quickstart's model with the old and the new defaults, trained for the same number of steps.

    python benchmarks/quickstart_defaults.py --steps 600     # the steps the timed quickstart did

The quickstart is bounded by time, so on a busy machine it gets fewer steps; this script compares
the `small` preset before (damping=None) and after (the ALiBi damping schedule) at the SAME number
of steps with the quickstart's settings (batch 16 × 64, lr 3e-3, warmup 20, cosine to lr/10, seed
1337), and scores both on the whole validation split two ways: windows of 64 tokens from an empty
state (what training optimises) and streams of 4,096 tokens read through the state (what
generation does), by position. `--checkpoints DIR ...` scores trained checkpoints the same way.
Results: benchmarks/results/quickstart_defaults.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import common
from bdh import data as bdh_data
from bdh.checkpoint import load_checkpoint
from bdh.streams import evaluate_streams, format_buckets
from bdh.train import TrainConfig, evaluate, train

RUNS = {"old (damping=None)": {"damping": None}, "new (damping=alibi)": {}}


def train_config(args: argparse.Namespace, name: str, fields: dict[str, Any]) -> TrainConfig:
    out = Path(args.out) / ("old" if fields else "new")
    config_file = None
    if fields:  # model options go through a config file, as on the command line
        out.mkdir(parents=True, exist_ok=True)
        config_file = str(out / "model.json")
        Path(config_file).write_text(json.dumps(fields))
    return TrainConfig(
        data="shakespeare", out=str(out), preset="small", config_file=config_file,
        max_steps=args.steps, batch_size=16, block_size=64, lr=3e-3, warmup_steps=20,
        eval_interval=args.steps, ckpt_interval=args.steps, seed=1337, threads=args.threads,
    )  # fmt: skip


def score(path: str | Path, length: int) -> dict[str, Any]:
    """Windows and stream losses of a checkpoint on the whole validation split."""
    ckpt = load_checkpoint(path)
    val = bdh_data.tokenize_cached(bdh_data.load_corpus("shakespeare").val, ckpt.tokenizer)
    block = int(ckpt.meta["train"]["block_size"])
    windows = evaluate(ckpt.model, val, ckpt.tokenizer.bytes_per_token, block)
    stream = evaluate_streams(ckpt.model, val, ckpt.tokenizer.bytes_per_token, block, length)
    return {
        "step": ckpt.meta.get("step"),
        "damping": ckpt.config.damping,
        "windows": windows.to_dict(),
        "stream": stream.to_dict(),
        "table": format_buckets(stream, windows.bpb),
    }


def main() -> None:
    args = parse_args()
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    print(f"settings: {vars(args)}", flush=True)
    results: dict[str, Any] = {"machine": info, "settings": vars(args), "runs": {}}
    for name, fields in RUNS.items():
        cfg = train_config(args, name, fields)
        start = time.perf_counter()
        train(cfg, progress=False, log=lambda line: None)
        seconds = time.perf_counter() - start
        results["runs"][name] = {"train_seconds": seconds, **score(cfg.out, args.length)}
        report(name, results["runs"][name])
        common.write_json(args.json, results)
    for path in args.checkpoints:
        results["runs"][path] = score(path, args.length)
        report(path, results["runs"][path])
        common.write_json(args.json, results)


def report(name: str, r: dict[str, Any]) -> None:
    print(
        f"\n{name}, step {r['step']}: windows {r['windows']['bpb']:.4f} bits/byte,"
        f" stream {r['stream']['bpb']:.4f} bits/byte\n{r['table']}",
        flush=True,
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps of each run")
    ap.add_argument("--length", type=int, default=4096, help="tokens per stream")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--checkpoints", nargs="*", default=[], help="also score these checkpoints")
    ap.add_argument("--out", default="runs/quickstart_defaults")
    ap.add_argument("--json", default=str(common.RESULTS / "quickstart_defaults.json"))
    return ap.parse_args()


if __name__ == "__main__":
    main()
