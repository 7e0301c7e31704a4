"""Peak memory of `bdh eval` on data files of growing size: it must not grow with the file.

For each size a text file is generated in a scratch directory (deleted afterwards), then `bdh eval
--data FILE --max-tokens N` runs in a fresh process with an empty token cache, so the run hashes
and tokenises the whole file (streamed, `bdh.data.tokenize_file`) and scores its first N tokens;
a second run finds the tokens cached. Peak resident memory (ru_maxrss) of each run is recorded.

With --train, `bdh train --data FILE --max-steps 2` is measured the same way.

Control: the same file read and tokenised whole (`load_corpus` + `tokenize_cached`, the path a
folder or a named corpus takes), which shows that the measurement sees file-sized memory.

    python benchmarks/large_file.py                       # 100 MiB, 500 MiB, 2 GiB
    python benchmarks/large_file.py --sizes-mb 8,32 --control-mb 8 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bdh.train import TrainConfig, train
from common import RESULTS, machine_info, machine_line, run_isolated

EVAL = """
import json, sys, time
from bdh.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
status = open("/proc/self/status").read().split("VmHWM:")[1]
peak = int(status.split()[0]) * 1024  # this process's own peak (ru_maxrss counts the parent's)
print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak}))
"""

CONTROL = """
import json, sys
from bdh import data
from bdh.tokenizer import ByteTokenizer
tokens = data.tokenize_cached(data.load_corpus(sys.argv[1]).split("all"), ByteTokenizer())
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"tokens": len(tokens), "peak_rss": peak}))
"""

WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with"]
WORDS += ["king", "lord", "good", "love", "night", "sweet", "death"]


def write_text_file(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of pseudo-English, written one 1 MiB block at a time."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(30000)]
    block = ("\n".join(lines).encode() * 2)[: 1 << 20]
    with open(path, "wb") as f:
        for i in range(0, size, len(block)):
            shift = i % 997  # blocks differ, so the text is not one block repeated
            f.write((block[shift:] + block[:shift])[: size - i])


def tiny_checkpoint(work: Path) -> Path:
    data = work / "train.txt"
    write_text_file(data, 200_000, seed=1)
    cfg = TrainConfig(
        data=str(data), out=str(work / "run"), preset="tiny", max_steps=2, batch_size=4,
        block_size=64, eval_batches=1, threads=1,
    )  # fmt: skip
    train(cfg, progress=False, log=lambda s: None)
    return work / "run"


def eval_run(run: Path, data: Path, max_tokens: int) -> dict:
    argv = ["eval", "--ckpt", str(run), "--data", str(data), "--max-tokens", str(max_tokens)]
    result = run_isolated(["-c", EVAL, *argv, "--json"], timeout=3600)
    assert result["code"] == 0, result
    return result


def train_run(data: Path, out: Path) -> dict:
    """`bdh train` for 2 steps on the file: streams its tokens too."""
    argv = ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps"]
    argv += ["2", "--batch-size", "4", "--block-size", "64", "--eval-batches", "1"]
    result = run_isolated(["-c", EVAL, *argv, "--threads", "1", "--no-progress"], timeout=3600)
    assert result["code"] == 0, result
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", default="100,500,2048", help="file sizes in MiB")
    p.add_argument("--max-tokens", type=int, default=100_000, help="tokens scored per file")
    p.add_argument("--control-mb", type=int, default=100, help="size of the whole-read control")
    p.add_argument("--train", action="store_true", help="also measure `bdh train` on each file")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a new /tmp dir)")
    p.add_argument("--out", default=str(RESULTS / "large_file.json"))
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    info = machine_info()
    print(f"[large] sizes {sizes} MiB, {args.max_tokens:,} tokens scored, tiny BDH, bytes")
    print(machine_line(info))
    work = Path(tempfile.mkdtemp(prefix="bdh-large-", dir=args.workdir))
    os.environ["BDH_CACHE"] = str(work / "cache")  # the children inherit it
    rows = []
    try:
        run = tiny_checkpoint(work)
        for mb in sizes:
            file = work / f"data-{mb}.txt"
            write_text_file(file, mb * 2**20)
            shutil.rmtree(work / "cache" / "tokens", ignore_errors=True)
            first = eval_run(run, file, args.max_tokens)  # hashes + tokenises
            again = eval_run(run, file, args.max_tokens)  # tokens cached
            row = {"file_mib": mb, "first_s": first["seconds"], "cached_s": again["seconds"]}
            row |= {"peak_rss_mib": first["peak_rss"] / 2**20}
            row |= {"peak_rss_cached_mib": again["peak_rss"] / 2**20}
            if args.train:
                trained = train_run(file, work / f"run-{mb}")  # tokenises both splits again
                row |= {
                    "train_s": trained["seconds"],
                    "train_peak_rss_mib": trained["peak_rss"] / 2**20,
                }
            if mb == args.control_mb:
                control = run_isolated(["-c", CONTROL, str(file)], timeout=3600)
                row["control_whole_read_peak_rss_mib"] = control["peak_rss"] / 2**20
            rows.append(row)
            print(json.dumps(row))
            file.unlink()
            shutil.rmtree(work / "cache" / "tokens", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "max_tokens": args.max_tokens,
        "rows": rows,
        "machine": info,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[large] wrote {args.out}")


if __name__ == "__main__":
    main()
