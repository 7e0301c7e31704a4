"""Large inputs: a data file is tokenised and evaluated in pieces, in memory that does not grow
with its size. The pieces give the same tokens and the same loss as the whole text at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bdh import data as bdh_data
from bdh.cli import main
from bdh.tokenizer import BPETokenizer, ByteTokenizer
from bdh.train import TrainConfig, _prepare_data, evaluate_checkpoint
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--batch-size", "4", "--block-size", "16", "--eval-batches", "2"]
TINY += ["--threads", "1", "--no-progress", "--max-steps", "2"]


def _awkward_text() -> bytes:
    """Newlines beside spaces and CR, multi-byte characters and invalid UTF-8: every place a
    careless cut would change the BPE tokens."""
    parts = [synthetic_text(3000).encode(), "\r\n  été — 東京\n\n\tx\n".encode(), b"\xff\xc3\n"]
    return b"".join(parts * 6)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_tokens_of_a_file_in_pieces_equal_the_whole_texts(tmp_path, monkeypatch, kind):
    text = _awkward_text()
    file = tmp_path / "big.txt"
    file.write_bytes(text)
    tok = ByteTokenizer() if kind == "bytes" else BPETokenizer.train([text.decode("latin-1")], 300)
    monkeypatch.setattr(bdh_data, "CHUNK_BYTES", 97)  # hundreds of pieces
    for start, end in [(0, len(text)), (5, len(text) - 3), (1000, 9000)]:
        pieces = np.asarray(bdh_data.tokenize_file(file, tok, start, end, cache=tmp_path / "c"))
        np.testing.assert_array_equal(pieces, tok.encode(text[start:end]))


def test_a_token_file_reads_like_the_array_it_holds(tmp_path):
    ids = np.random.default_rng(0).integers(0, 256, 1000).astype(np.uint16)
    ids.tofile(tmp_path / "ids.uint16")
    tokens = bdh_data.TokenFile(tmp_path / "ids.uint16", np.uint16)
    for lo, hi in [(0, 1000), (3, 17), (990, 2000), (500, 400)]:
        np.testing.assert_array_equal(np.asarray(tokens[lo:hi]), ids[lo:hi])
        np.testing.assert_array_equal(np.asarray(tokens[lo:][: hi - lo]), ids[lo:][: hi - lo])
    assert len(tokens) == 1000 and tokens.max() == ids.max()


@pytest.mark.parametrize("split", ["all", "val"])
def test_evaluating_a_file_in_pieces_equals_evaluating_it_whole(tmp_path, monkeypatch, split):
    data, run = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(synthetic_text(6000))
    assert main(["train", "--data", str(data), "--out", str(run), *TINY]) == 0
    whole_text = bdh_data.load_corpus(str(data)).split(split)
    whole_tokens = bdh_data.tokenize_cached(whole_text, ByteTokenizer(), cache=tmp_path / "w")
    monkeypatch.setattr(bdh_data, "CHUNK_BYTES", 113)
    streamed, _ = evaluate_checkpoint(run, str(data), split, batch_size=5)
    monkeypatch.setattr(bdh_data, "tokenize_split", lambda *a: whole_tokens)
    whole, _ = evaluate_checkpoint(run, str(data), split, batch_size=5)
    assert streamed == whole


def test_training_on_a_file_reads_the_tokens_of_its_whole_text(tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    data.write_text(synthetic_text(6000))
    monkeypatch.setattr(bdh_data, "CHUNK_BYTES", 101)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"))
    _, train_tokens, val_tokens = _prepare_data(cfg, None, lambda line: None)
    assert isinstance(train_tokens, bdh_data.TokenFile)  # streamed, not read whole
    corpus = bdh_data.load_corpus(str(data))
    for streamed, text in [(train_tokens, corpus.train), (val_tokens, corpus.val)]:
        np.testing.assert_array_equal(np.asarray(streamed), ByteTokenizer().encode(text))


# ---------------------------------------------------------------- peak memory, in a real process

PEAK = """
import sys
from bdh.cli import main
code = main(sys.argv[1:])
# VmHWM: this process's own peak (ru_maxrss would report the parent's if it was larger)
print("peak_kib", open("/proc/self/status").read().split("VmHWM:")[1].split()[0], flush=True)
sys.exit(code)
"""


def write_text_file(path: Path, size: int) -> None:
    """`size` bytes of varied text, written a block at a time (no big buffer here either)."""
    block = synthetic_text(1 << 20).encode()
    with open(path, "wb") as f:
        for i in range(0, size, len(block)):
            piece = block[: size - i]
            f.write(piece[i % 997 :] + piece[: i % 997])  # shifted so blocks differ


def peak_rss(argv: list[str], cache: Path) -> int:
    """Peak resident memory (bytes) of `bdh argv` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["BDH_CACHE"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("peak_kib")[1]) * 1024


@pytest.mark.slow
def test_peak_memory_of_evaluating_a_300_mb_file_does_not_grow_with_its_size(tmp_path):
    data, run = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(synthetic_text(6000))
    assert main(["train", "--data", str(data), "--out", str(run), *TINY]) == 0
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    write_text_file(small, 3 * 2**20)
    write_text_file(big, 300 * 2**20)
    peaks = {}
    for f in (small, big):
        evaluate = ["eval", "--ckpt", str(run), "--data", str(f), "--max-tokens", "20000"]
        train = ["train", "--data", str(f), "--out", str(tmp_path / f"run-{f.stem}"), *TINY]
        peaks[f] = [peak_rss(argv, tmp_path / "cache") for argv in (evaluate, train)]
    print(
        f"\n[large] peak RSS of eval, train: 3 MiB file {peaks[small][0] / 2**20:.0f},"
        f" {peaks[small][1] / 2**20:.0f} MiB; 300 MiB file {peaks[big][0] / 2**20:.0f},"
        f" {peaks[big][1] / 2**20:.0f} MiB"
    )
    for grown in np.subtract(peaks[big], peaks[small]):
        assert grown < 64 * 2**20  # the file is 300 MiB, its tokens 600 MiB
