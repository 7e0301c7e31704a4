"""How sparse a checkpoint's neurons are, trained against untrained (paper §4.1: ~5% of x active).

    python benchmarks/sparsity.py --checkpoint runs/quickstart [--max-tokens N] [--out DIR]

Both models read the same held-out tokens (the validation split of the checkpoint's training data,
or --data) in windows of the training block, each from an empty state. The untrained model is the
checkpoint's config with the weights `bdh train` drew from its seed before the first step. Prints
the configuration, the machine line and a table (x and y density per layer, dead and always-on
neurons, active neurons per token); writes sparsity.json, sparsity.md and one PNG per model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bdh.interpret.sparsity import plot, sparsity_of_checkpoint, table_markdown
from common import RESULTS, ensure_quiet_threads, machine_info, machine_line, write_json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a BDH checkpoint or run directory")
    p.add_argument("--data", help="source to read (default: the checkpoint's training data)")
    p.add_argument("--max-tokens", type=int, help="read only the first N tokens (default: all)")
    p.add_argument("--block-size", type=int, help="window length (default: the training block)")
    p.add_argument("--out", default=str(RESULTS / "sparsity"), help="output directory")
    args = p.parse_args(argv)
    ensure_quiet_threads()
    info = machine_info()
    print(f"[sparsity] {vars(args)}")
    print(machine_line(info))
    out = Path(args.out)
    summaries, measured = {}, {}
    for name in ("trained", "untrained"):
        start = time.perf_counter()
        stats, what = sparsity_of_checkpoint(
            args.checkpoint, args.data, None, args.max_tokens, args.block_size, name == "untrained"
        )
        what["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[sparsity] {name}: {what}")
        summaries[name] = stats.to_dict(neurons=True)
        measured[name] = what
        plot(stats, out / f"sparsity_{name}.png", f"{name}: {what['checkpoint']}")
    table = table_markdown(summaries)
    print(table)
    write_json(out / "sparsity.json", {"args": vars(args), "machine": info,
                                       "torch_threads": torch.get_num_threads(),
                                       "measured": measured, "results": summaries})  # fmt: skip
    (out / "sparsity.md").write_text(table)
    print(f"wrote {out / 'sparsity.json'}, {out / 'sparsity.md'} and the PNGs")


if __name__ == "__main__":
    main()
