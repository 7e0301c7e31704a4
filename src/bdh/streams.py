"""Held-out text read as continuous streams, as generation reads it: the stream loss, by position.

`bdh.train.evaluate` scores windows of the training block, each from an empty context: a model
is only ever asked what it was trained for. Generation is different: `sample` and `generate` read
the prompt and their own output through one state that is carried token after token, so what
matters there is the loss at position 1,000 or 4,000 of a stream. Here the split is cut into
consecutive streams of `length` tokens; each is read from an empty state in pieces of `piece`
tokens with the state carried between them, and every prediction's loss is kept with its position
in the stream, so the loss can be reported for position buckets 0–T, T–2T, 2T–4T, … (T = the
training block).

A BDH model is read through its training trunk with a state, `model(idx, state=state)`; a model
without one (the GPT baseline) through `model.step` and its key-value cache. Both see, for every
token, exactly the text before it in its stream.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdh.data import DataError

STREAM_LENGTH = 4096  # tokens per stream: 64× the quickstart's training block


@dataclass
class Bucket:
    start: int  # first position (0 = the first prediction of a stream)
    stop: int  # one past the last position
    loss: float  # nats per token
    bpb: float  # bits per byte
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StreamResult:
    loss: float  # nats per predicted token, over every position
    bpb: float
    tokens: int
    bytes: int
    length: int  # tokens per stream (the last stream may be shorter)
    streams: int
    buckets: list[Bucket]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def position_edges(block: int, length: int) -> list[int]:
    """0, T, 2T, 4T, … up to `length`: the bucket edges (the last one is `length`)."""
    if block < 1 or length < 1:
        raise ValueError(f"block and length must be positive, got {block} and {length}")
    edges, edge = [0], block
    while edge < length:
        edges.append(edge)
        edge *= 2
    return [*edges, length]


@torch.no_grad()
def token_losses(model: nn.Module, rows: Tensor, piece: int = 256) -> Tensor:
    """Nats of predicting rows[:, 1:] from what precedes each token: (S, L) for rows (S, L+1).

    Each row is one stream, read from an empty state in pieces of `piece` tokens.
    """
    x, y = rows[:, :-1], rows[:, 1:]
    device = next(model.parameters()).device
    state = model.init_state(x.shape[0])
    out = []
    for start in range(0, x.shape[1], piece):
        logits = _read(model, x[:, start : start + piece].to(device), state)
        target = y[:, start : start + piece].to(device)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none")
        out.append(nats.view_as(target).cpu())
    return torch.cat(out, dim=1)


def _read(model: nn.Module, idx: Tensor, state: Any) -> Tensor:
    """Logits of idx continuing the streams in `state`, which is advanced."""
    from bdh.model import BDH

    if isinstance(model, BDH):
        return model(idx, state=state)[0]  # the training trunk through the state
    return model.step(idx, state)[0]


def evaluate_streams(
    model: nn.Module,
    tokens: np.ndarray,
    bytes_per_token: np.ndarray,
    block: int,
    length: int = STREAM_LENGTH,
    batch_size: int = 16,
    piece: int = 256,
    progress: bool = False,
) -> StreamResult:
    """Loss over `tokens` cut into streams of `length` predictions, with buckets by position.

    Consecutive streams share no text; a tail shorter than `length` is read as a last stream.
    """
    if len(tokens) < 2:
        raise DataError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    if length < 1 or batch_size < 1 or piece < 1:
        raise ValueError(
            f"stream length, batch size and piece must be positive, got {length}, {batch_size},"
            f" {piece}"
        )
    was_training = model.training
    model.eval()
    nbytes = torch.from_numpy(np.asarray(bytes_per_token, dtype=np.int64))
    sums = torch.zeros(3, length, dtype=torch.float64)  # nats, tokens, bytes at each position
    streams = 0
    for rows in _streams(tokens, length, batch_size, progress):
        nats = token_losses(model, rows, piece).double()  # (S, L)
        L = nats.shape[1]
        sums[0, :L] += nats.sum(0)
        sums[1, :L] += rows.shape[0]
        sums[2, :L] += nbytes[rows[:, 1:]].sum(0).double()
        streams += rows.shape[0]
    model.train(was_training)
    edges = position_edges(block, min(length, len(tokens) - 1))
    buckets = [_bucket(sums[:, a:b], a, b) for a, b in itertools.pairwise(edges)]
    total = _bucket(sums, 0, length)
    return StreamResult(
        total.loss, total.bpb, total.tokens, int(sums[2].sum()), length, streams, buckets
    )


def _bucket(sums: Tensor, start: int, stop: int) -> Bucket:
    nats, count, nbytes = (float(s) for s in sums.sum(1))
    return Bucket(start, stop, nats / count, nats / math.log(2) / nbytes, int(count))


def _streams(tokens: np.ndarray, length: int, batch_size: int, progress: bool) -> Iterator[Tensor]:
    """(S, length + 1) rows of consecutive streams, then the tail as a (1, t + 1) row."""
    from tqdm.auto import tqdm

    n = len(tokens) - 1  # predictions
    full = n // length
    starts = list(range(0, full * length, length))
    groups = [starts[i : i + batch_size] for i in range(0, full, batch_size)]
    for group in tqdm(groups, desc="streams", disable=not progress, leave=False, file=sys.stderr):
        rows = np.stack([tokens[s : s + length + 1] for s in group]).astype(np.int64)
        yield torch.from_numpy(rows)
    if n % length:
        yield torch.from_numpy(np.asarray(tokens[full * length :], dtype=np.int64))[None]


def format_buckets(result: StreamResult, windows_bpb: float | None = None) -> str:
    """A markdown table of bits/byte by position (one row), with the windows number beside."""
    head = "| position | " + " | ".join(f"{b.start}–{b.stop}" for b in result.buckets) + " |"
    rule = "|---|" + "---|" * len(result.buckets)
    row = "| stream, bits/byte | " + " | ".join(f"{b.bpb:.3f}" for b in result.buckets) + " |"
    lines = [head, rule, row]
    if windows_bpb is not None:
        lines.append(f"(windows of the training block: {windows_bpb:.3f} bits/byte)")
    return "\n".join(lines)


def evaluate_checkpoint_streams(
    path: str,
    data: str | None = None,
    split: str | None = None,
    max_tokens: int | None = None,
    length: int = STREAM_LENGTH,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[StreamResult, dict[str, Any]]:
    """`evaluate_streams` on the tokens `bdh.train.evaluate_checkpoint` scores in windows."""
    from bdh.checkpoint import load_checkpoint
    from bdh.train import checkpoint_tokens, choose_threads

    torch.set_num_threads(choose_threads())
    ckpt = load_checkpoint(path)
    tokens, what = checkpoint_tokens(ckpt, data, split, max_tokens)
    block = int(ckpt.meta.get("train", {}).get("block_size", 256))
    limit = getattr(ckpt.config, "max_context", None)  # a GPT's learned position table
    length = length if limit is None else min(length, limit)
    result = evaluate_streams(
        ckpt.model, tokens, ckpt.tokenizer.bytes_per_token, block, length, batch_size,
        progress=progress,
    )  # fmt: skip
    return result, {**what, "block_size": block}
