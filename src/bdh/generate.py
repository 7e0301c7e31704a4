"""Generation: prefill the prompt once, then decode one token at a time from the state.

Works for any model with `init_state(batch_size)` and `step(idx, state) -> (logits, state)` (BDH and
the GPT baseline); a model with a `decoding_engine()` (BDH, `bdh.decode`) gets its key-value path,
sparse steps and chunked prefill. `generate_naive` re-runs the whole prefix for every token, as the
reference code does; it is kept as the spec that the engine is tested and benchmarked against.

Stops: an end token id, a string (encoded as UTF-8 bytes for byte-level models, or by `encode`),
or a list of those; generation of a stream ends right after its first match, kept in the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bdh.state import BDHState

# One stop or several: an end token id, a string, bytes, or a token-id sequence.
Stop = Union[int, str, bytes, Sequence[Union[int, str, bytes, Sequence[int]]]]  # noqa: UP007


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
    # Shifted so the largest logit is 0: a tiny temperature then sends the others to -inf
    # instead of overflowing to inf - inf = NaN (softmax, top-k and top-p are shift-invariant);
    # float64, because a temperature below float32's range would round to 0 and give 0 / 0.
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
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


def stop_sequences(
    stop: Stop | None, vocab_size: int, encode: Callable[[str], list[int]] | None = None
) -> list[tuple[int, ...]]:
    """Normalise `stop` to token-id sequences; strings need byte-level ids or an `encode`."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, (int, str, bytes)) else list(stop)
    out = []
    for item in items:
        if isinstance(item, int):
            seq: tuple[int, ...] = (item,)
        elif isinstance(item, str):
            if encode is None and vocab_size != 256:
                raise ValueError(
                    f"stop string {item!r} needs `encode` for a vocabulary of {vocab_size} tokens"
                )
            seq = tuple(encode(item) if encode is not None else item.encode("utf-8"))
        else:
            seq = tuple(int(t) for t in item)
        if not seq or not all(0 <= t < vocab_size for t in seq):
            raise ValueError(f"stop {item!r} must be non-empty token ids in [0, {vocab_size})")
        out.append(seq)
    return out


def _as_ids(prompt: Tensor | bytes | Sequence[int]) -> Tensor:
    """Token ids of one prompt; bytes are their own ids for byte-level models."""
    return torch.as_tensor(list(prompt) if isinstance(prompt, bytes) else prompt, dtype=torch.long)


def hits_stop(tokens: Sequence[int], stops: list[tuple[int, ...]]) -> bool:
    """True when the generated tokens end with one of the stop sequences."""
    return any(len(tokens) >= len(s) and tuple(tokens[-len(s) :]) == s for s in stops)


def _engine(model: Any, options: Any) -> Any:
    """The model's decoding engine if it has one (BDH), else None (plain init_state/step)."""
    make = getattr(model, "decoding_engine", None)
    return make(options) if callable(make) else None


def _prefill(model: Any, engine: Any, idx: Tensor) -> tuple[Tensor, Any, Callable]:
    """Read the prompt once: (last logits (B, V), state, step function for the next tokens)."""
    if engine is not None:
        state = engine.init_state(idx.shape[0])
        return engine.prefill(idx, state), state, lambda tok: engine.step(tok, state)[:, -1]
    state = model.init_state(idx.shape[0])
    logits, state = model.step(idx, state)
    return logits[:, -1], state, lambda tok: model.step(tok, state)[0][:, -1]


@torch.no_grad()
def stream(
    model: Any,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    stop: Stop | None = None,
    encode: Callable[[str], list[int]] | None = None,
    options: Any = None,
) -> Iterator[Tensor]:
    """Yield each new token (B, 1) as soon as it is chosen; the prompt is read once."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    stops = stop_sequences(stop, model.config.vocab_size, encode)
    if stops and idx.shape[0] != 1:
        raise ValueError(
            f"stop needs batch 1 (got {idx.shape[0]} streams); use generate_batch for a batch"
        )
    if max_new_tokens == 0:
        return
    logits, _, step = _prefill(model, _engine(model, options), idx)
    generated: list[int] = []
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token
        generated.append(int(token[0, 0]))
        if (stops and hits_stop(generated, stops)) or i + 1 == max_new_tokens:
            return
        logits = step(token)  # one recurrent (or key-value) step per token


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
    *,
    stop: Stop | None = None,
    encode: Callable[[str], list[int]] | None = None,
    options: Any = None,
) -> Tensor:
    """idx (B, T) → (B, T + new); callback(token (B, 1)) is called for every token as it comes."""
    tokens = [idx]
    kwargs = {"stop": stop, "encode": encode, "options": options}
    for token in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, **kwargs):
        if callback is not None:
            callback(token)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def generate_batch(
    model: Any,
    prompts: Sequence[Tensor | bytes | Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    *,
    stop: Stop | None = None,
    encode: Callable[[str], list[int]] | None = None,
    options: Any = None,
) -> list[Tensor]:
    """Continue prompts of different lengths together; returns the new tokens of each, (≤ new,).

    BDH has no attention mask, so padding would leak into the state: each prompt is prefilled
    alone into its own state at its own positions, the states are stacked, and decoding runs
    batched with per-stream rotary phases. A stream that stops leaves the batch.
    callback(prompt_index, token_id) sees every token as it is chosen.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    engine = _engine(model, options)
    if engine is None:
        raise TypeError("generate_batch needs a model with `decoding_engine()` (BDH)")
    stops = stop_sequences(stop, model.config.vocab_size, encode)
    outputs: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens == 0:
        return [torch.tensor(o, dtype=torch.long) for o in outputs]
    rows = [_as_ids(p).view(1, -1) for p in prompts]
    states = [engine.init_state(1) for _ in rows]
    logits = torch.cat([engine.prefill(r, s) for r, s in zip(rows, states, strict=True)])
    state = BDHState.stack(states)
    live = list(range(len(rows)))  # batch row j decodes prompt live[j]
    for _ in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (b, 1)
        keep = []
        for j, p in enumerate(live):
            outputs[p].append(int(tokens[j, 0]))
            if callback is not None:
                callback(p, outputs[p][-1])
            if not hits_stop(outputs[p], stops) and len(outputs[p]) < max_new_tokens:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):  # drop finished streams so they cost nothing more
            state, tokens = state.select(keep), tokens[keep]
            live = [live[j] for j in keep]
        logits = engine.step(tokens, state)[:, -1]
    return [torch.tensor(o, dtype=torch.long) for o in outputs]


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
