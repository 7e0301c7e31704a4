"""Generation: prefill the prompt once, then decode one token at a time from the state.

Works for any model with `init_state(batch_size)` and `step(idx, state) -> (logits, state)` (BDH and
the GPT baseline). `generate_naive` re-runs the whole prefix for every token, as the reference code
does; it is kept as the spec that the state-based engine is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a one-line ValueError for sampling settings outside their range."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r} (use top_k=1 for greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer ≥ 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B, 1) from last-position logits (B, V). top_k=1 is exact argmax."""
    check_sampling(temperature, top_k, top_p)
    if top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens before it already reach top_p; the first always stays.
    drop_sorted = (cumulative - F.softmax(sorted_logits, dim=-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def stream(
    model: Any,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield each new token (B, 1) as soon as it is chosen; the prompt is read once."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    state = model.init_state(idx.shape[0])
    logits, state = model.step(idx, state)  # prefill: parallel or chunked form
    for i in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        yield token
        if i + 1 < max_new_tokens:
            logits, state = model.step(token, state)  # one recurrent step per token


@torch.no_grad()
def generate(
    model: Any,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """idx (B, T) → (B, T + max_new_tokens); callback(token (B, 1)) is called for every token."""
    tokens = [idx]
    for token in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        if callback is not None:
            callback(token)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def generate_naive(
    model: Any,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The reference's way: run the full forward pass over the whole prefix for every token."""
    check_sampling(temperature, top_k, top_p)
    for _ in range(max_new_tokens):
        logits, _ = model(idx)
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        idx = torch.cat((idx, token), dim=1)
    return idx
