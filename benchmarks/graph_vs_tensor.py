"""A trained BDH-GPU model converted to the graph model: does it predict the same next tokens?

    # a checkpoint from `bdh train`: the passage comes from its own validation split
    python benchmarks/graph_vs_tensor.py --checkpoint runs/bdh --tokens 128
    # another source: a text file (its last 10%, as `bdh train` splits it) or a named corpus
    python benchmarks/graph_vs_tensor.py --checkpoint runs/bdh --text data.txt --tokens 128
    # no checkpoint: a randomly initialised preset (tiny runs in seconds, small in minutes)
    python benchmarks/graph_vs_tensor.py --random small --tokens 64

The held-out passage is taken from the validation split of --text (default: the checkpoint's
training data), or is random token ids for a random model without --text. Prints one row per
model (bdh.graph.compare): the trained model, the same weights with one option changed at a time
towards the paper's BDH, and the graphs (by default: converted with the model's own options, which
must agree 100%, and the paper's BDH); writes the rows as JSON to --json (default
benchmarks/results/graph_vs_tensor.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdh import BDH, BDHConfig
from bdh.graph.compare import as_dicts, compare, table

RESULTS = Path(__file__).resolve().parent / "results"


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, description) from --checkpoint or --random."""
    if args.checkpoint:
        from bdh.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        args.text = args.text or ckpt.meta.get("train", {}).get("data")
        return ckpt.model.eval(), ckpt.tokenizer, f"checkpoint {ckpt.path}"
    torch.manual_seed(args.seed)
    config = BDHConfig.from_name(args.random, dropout=0.0)
    return BDH(config).eval(), None, f"random {args.random} (seed {args.seed})"


def passage(args: argparse.Namespace, tokenizer: Any, vocab: int) -> np.ndarray:
    """--tokens ids from the validation split of --text (bytes if no tokenizer), else random."""
    if not args.text:
        return np.random.default_rng(args.seed).integers(0, vocab, args.tokens)
    from bdh.data import load_corpus

    held_out = load_corpus(args.text).split("val")  # how `bdh train` splits the source
    ids = tokenizer.encode(held_out) if tokenizer is not None else np.frombuffer(held_out, np.uint8)
    ids = np.asarray(ids, dtype=np.int64)[args.offset : args.offset + args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"--text has only {len(ids)} held-out tokens after --offset {args.offset}")
    return ids


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a `bdh train` run directory or checkpoint directory")
    src.add_argument("--random", choices=["tiny", "small"], help="a randomly initialised preset")
    p.add_argument(
        "--text",
        metavar="SOURCE",
        help="where the held-out passage comes from: a text file (its last 10%%) or a named"
        " corpus (its validation split); default: the checkpoint's training data",
    )
    p.add_argument("--tokens", type=int, default=128, help="passage length (default 128)")
    p.add_argument("--offset", type=int, default=0, help="first held-out token used")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument(
        "--rungs",
        choices=["ends", "all", "none"],
        default="ends",
        help="graphs for: the model's own options and the paper's BDH (ends), every rung, none",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="where to write the rows (default benchmarks/results/...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer, what = load(args)
    ids = passage(args, tokenizer, model.config.vocab_size)
    print(f"{what}; config {model.config.to_dict()}")
    print(f"passage: {len(ids)} tokens; dtype {args.dtype}\n")
    rows = compare(model, ids, rungs=args.rungs, dtype=np.dtype(args.dtype))
    print(table(rows))
    out = Path(args.json) if args.json else RESULTS / "graph_vs_tensor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"source": what, "config": model.config.to_dict(), "tokens": len(ids)}
    if tokenizer is not None:
        from bdh.tokenizer import decode

        payload["passage"] = decode(tokenizer, ids.tolist())
    out.write_text(json.dumps({**payload, "rows": as_dicts(rows)}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return as_dicts(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
