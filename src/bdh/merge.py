"""Merging, growing and pruning BDH models along the neuron axis (paper §7.1, Table 2).

Notation: nh heads, N neurons per head, D = n_embd, V vocabulary. Every BDH weight is indexed
either by neurons or by D only:

    encoder    (nh, D, N)    D_x: neuron axis 2
    encoder_v  (nh, D, N)    D_y: neuron axis 2
    decoder    (nh·N, D)     E, head-major rows: viewed as (nh, N, D), neuron axis 1 *per head*
    attn.freqs (1, 1, 1, N)  rotary frequency of each neuron, shared by the heads
    embed.weight (V, D), lm_head (D, V): no neuron axis ("shared" tensors)

Merging puts the parents' neurons side by side in every head (the decoder is concatenated per
head, never along its flat first axis, which would move neurons between heads) and averages the
shared tensors, or combines them as BASE + Σ(child − BASE). The frequencies travel with their
neurons: a merged or pruned model never regenerates them.

Why a model merged with itself computes the same function: every sum over neurons doubles (the
attention scores Σ_i x_t,i x_τ,i and the decoder sum Σ_i y_i E_i), and both feed a LayerNorm,
which is scale-invariant; each neuron's own y is unchanged. (BDH-Normfree has no such cancellation.)

The config's neuron count is N = mlp_internal_dim_multiplier · D / nh, so every width here is a
multiple of D / nh (and even, for the rotary pairs): a merge always is; grow and prune round to it.
The heritage map (`config.meta["heritage"]`) records which per-head neuron ranges came from which
parent: a list of {"source": name, "ranges": [[start, stop] for each head]}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bdh.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from bdh.config import BDHConfig
from bdh.model import BDH

State = dict[str, Tensor]
SHARED_TENSORS = ("embed.weight", "lm_head")
# Fields that change what a model computes from its weights; parents must agree on them.
STRUCTURAL = (
    "n_layer",
    "n_embd",
    "n_head",
    "vocab_size",
    "damping",
    "residual",
    "layernorm",
    "rope",
)
SHARED_MODES = ("mean", "task-arithmetic")
# Scale of a grown neuron's D_x column relative to the model's init (see `grow_state`).
GROW_SCALE = 1e-3


class MergeError(ValueError):
    """Models that cannot be merged, grown or pruned as asked; the message names the problem."""


# ---------------------------------------------------------------------------- per-head neuron views


def split_neurons(state: State, nh: int) -> dict[str, Tensor]:
    """The neuron-indexed tensors as (heads, N, k) views: neuron axis 1, heads first.

    encoder/encoder_v/decoder → (nh, N, D); freqs → (1, N, 1) (one frequency per neuron for all
    heads).
    """
    return {
        "encoder": state["encoder"].transpose(1, 2),
        "encoder_v": state["encoder_v"].transpose(1, 2),
        "decoder": state["decoder"].view(nh, -1, state["decoder"].shape[-1]),
        "attn.freqs": state["attn.freqs"].reshape(1, -1, 1),
    }


def join_neurons(parts: dict[str, Tensor]) -> State:
    """The inverse of `split_neurons`: back to the model's own layouts, contiguous."""
    nh, N, D = parts["decoder"].shape
    return {
        "encoder": parts["encoder"].transpose(1, 2).contiguous(),
        "encoder_v": parts["encoder_v"].transpose(1, 2).contiguous(),
        "decoder": parts["decoder"].reshape(nh * N, D).contiguous(),
        "attn.freqs": parts["attn.freqs"].reshape(1, 1, 1, N).contiguous(),
    }


def _with_width(config: BDHConfig, N: int, heritage: list[dict[str, Any]]) -> BDHConfig:
    """`config` with N neurons per head and the heritage map in its meta."""
    unit = width_unit(config)
    if N % unit:
        raise MergeError(
            f"{N} neurons per head is not a multiple of {unit} (n_embd / n_head, and even)"
        )
    multiplier = N * config.n_head // config.n_embd
    meta = {**config.meta, "heritage": heritage}
    return config.replace(mlp_internal_dim_multiplier=multiplier, meta=meta)


def width_unit(config: BDHConfig) -> int:
    """The step of possible N: N · nh must be a multiple of D (an integer multiplier), N even."""
    return math.lcm(config.n_embd // math.gcd(config.n_embd, config.n_head), 2)


def heritage_of(config: BDHConfig, name: str) -> list[dict[str, Any]]:
    """The heritage map of a model: its own, or all of its neurons from `name`."""
    found = config.meta.get("heritage")
    if found:
        return [dict(entry) for entry in found]
    return [{"source": name, "ranges": [[0, config.N]] * config.n_head}]


def _shift(heritage: list[dict[str, Any]], offset: int) -> list[dict[str, Any]]:
    return [{**e, "ranges": [[a + offset, b + offset] for a, b in e["ranges"]]} for e in heritage]


# ---------------------------------------------------------------------------- merge


def check_compatible(configs: Sequence[BDHConfig], names: Sequence[str]) -> None:
    """Raise a one-line MergeError if the models differ in anything but their neuron count."""
    first = configs[0]
    for config, name in zip(configs[1:], names[1:], strict=True):
        for field in STRUCTURAL:
            a, b = getattr(first, field), getattr(config, field)
            if a != b:
                raise MergeError(
                    f"cannot merge {names[0]} and {name}: {field} differs ({a!r} vs {b!r})"
                )


def merge_states(
    configs: Sequence[BDHConfig],
    states: Sequence[State],
    names: Sequence[str],
    base: tuple[BDHConfig, State] | None = None,
    shared: str = "mean",
) -> tuple[BDHConfig, State]:
    """Concatenate the parents' neurons (per head) and combine their shared tensors.

    shared="mean" averages embed/lm_head; "task-arithmetic" needs `base` and gives
    BASE + Σ(child − BASE). Returns the merged config (with its heritage map) and weights.
    """
    if len(states) < 2:
        raise MergeError(f"a merge needs at least two models, got {len(states)}")
    if shared not in SHARED_MODES:
        raise MergeError(f"shared must be one of {', '.join(SHARED_MODES)}, got {shared!r}")
    if shared == "task-arithmetic" and base is None:
        raise MergeError("--shared task-arithmetic needs --base (the model the children share)")
    if base is None:
        check_compatible(configs, names)
    else:
        check_compatible([*configs, base[0]], [*names, "the base"])
    nh = configs[0].n_head
    parts = [split_neurons(s, nh) for s in states]
    merged = join_neurons({k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]})
    merged |= _combine_shared(states, base[1] if base else None, shared)
    heritage, offset = [], 0
    for config, name in zip(configs, names, strict=True):
        heritage += _shift(heritage_of(config, name), offset)
        offset += config.N
    return _with_width(configs[0], offset, heritage), merged


def _combine_shared(states: Sequence[State], base: State | None, shared: str) -> State:
    out = {}
    for key in SHARED_TENSORS:
        stack = torch.stack([s[key] for s in states])
        if shared == "mean":
            out[key] = stack.mean(0)
        else:
            assert base is not None
            out[key] = base[key] + (stack - base[key]).sum(0)
    return out


def merge_models(
    models: Sequence[BDH], names: Sequence[str] | None = None, base: BDH | None = None,
    shared: str = "mean",
) -> BDH:  # fmt: skip
    """`merge_states` on models: a new BDH holding every parent's neurons."""
    names = list(names or [f"model{i}" for i in range(len(models))])
    config, state = merge_states(
        [m.config for m in models], [m.state_dict() for m in models], names,
        (base.config, base.state_dict()) if base is not None else None, shared,
    )  # fmt: skip
    return _build(config, state)


def _build(config: BDHConfig, state: State) -> BDH:
    model = BDH(config)
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------- grow


def grown_frequencies(K: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rotary frequencies of K new neurons (K/2 pairs), (K,) in turns per position.

    The standard ladder of N neurons puts pair j at θ^(−2j/N); new pair j sits at the geometric
    midpoint θ^(−(2j+1)/K) of a K-neuron ladder: the same band of periods, and when K = N each new
    pair falls exactly between two old rungs, so no frequency repeats.
    """
    from bdh.ops.rope import ROPE_THETA

    pair = torch.arange(K, dtype=dtype).div(2, rounding_mode="floor")
    return 1.0 / (ROPE_THETA ** ((2 * pair + 1) / K)) / (2 * math.pi)


def grow_state(
    config: BDHConfig,
    state: State,
    K: int,
    scale: float = GROW_SCALE,
    generator: torch.Generator | None = None,
    name: str = "parent",
) -> tuple[BDHConfig, State]:
    """Append K neurons to every head that leave the model's function unchanged.

    A new neuron's decoder row is zero, so its y never reaches the residual stream. Its D_x column
    cannot be random at full scale: its x would join its head's attention scores (the linear
    attention sums x_t,i x_τ,i over all of a head's neurons) and change every output. A zero D_x
    column would keep it silent forever (x = relu(0) = 0 passes no gradient), so D_x starts at
    `scale` × the model's init: the scores then change by O(scale²) relative, far below float32
    resolution at the default 1e-3, while the gradients are nonzero and Adam, which normalises
    their size, trains the new neurons at the full learning rate. D_y gets the model's init.
    """
    if not isinstance(K, int) or K < 1:
        raise MergeError(f"--add-neurons must be a positive integer, got {K!r}")
    if not scale >= 0:
        raise MergeError(f"the grow scale must be >= 0, got {scale!r}")
    nh, D = config.n_head, config.n_embd
    old = split_neurons(state, nh)
    dtype = old["encoder"].dtype

    def init(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * 0.02  # BDH's N(0, 0.02²)

    new = {
        "encoder": init(nh, K, D) * scale,
        "encoder_v": init(nh, K, D),
        "decoder": torch.zeros(nh, K, D, dtype=dtype),
        "attn.freqs": grown_frequencies(K, old["attn.freqs"].dtype).view(1, K, 1),
    }
    grown = join_neurons({k: torch.cat([old[k], new[k]], dim=1) for k in old})
    grown |= {k: state[k].clone() for k in SHARED_TENSORS}
    grown_entry = {"source": "grown", "ranges": [[config.N, config.N + K]] * nh}
    heritage = [*heritage_of(config, name), grown_entry]
    return _with_width(config, config.N + K, heritage), grown


def grow_model(model: BDH, K: int, scale: float = GROW_SCALE, seed: int = 0) -> BDH:
    generator = torch.Generator().manual_seed(seed)
    config, state = grow_state(model.config, model.state_dict(), K, scale, generator)
    return _build(config, state)


# ---------------------------------------------------------------------------- prune


def decoder_norm_scores(config: BDHConfig, state: State) -> Tensor:
    """(nh, N): the norm of each neuron's decoder row, how much it can write to the stream."""
    return split_neurons(state, config.n_head)["decoder"].norm(dim=-1)


@torch.no_grad()
def firing_rate_scores(
    model: BDH, tokens: Tensor, block_size: int = 256, batch_size: int = 8
) -> Tensor:
    """(nh, N): how often each neuron fires (y > 0), averaged over layers and token positions.

    y = x ⊙ relu(LN(a) D_y) is what a neuron writes through the decoder; it is read from the
    model's own activation points (`model.run_with_cache`), never recomputed here. `tokens` (n,)
    is cut into windows of block_size, each read from an empty context, as in training.
    """
    T = min(block_size, tokens.numel())
    windows = tokens[: tokens.numel() // T * T].view(-1, T)  # (windows, T)
    if windows.shape[0] == 0:
        raise MergeError("prune --by firing needs at least one token of data")
    L, nh, N = model.config.n_layer, model.config.n_head, model.config.N
    names = [f"layers.{layer}.y" for layer in range(L)]
    fired, positions = torch.zeros(nh, N, dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    for rows in windows.split(batch_size):
        _, cache = model.run_with_cache(rows.long(), names=names)
        for name in names:
            fired += (cache[name] > 0).sum(dim=(0, 2)).double()  # (B, nh, T, N) → (nh, N)
        positions += rows.numel() * L
    model.train(was_training)
    return (fired / positions).float()


def kept_count(config: BDHConfig, keep: float) -> int:
    """Neurons per head kept for a fraction `keep`, rounded to a multiple of `width_unit`."""
    if not 0.0 < keep <= 1.0:
        raise MergeError(f"--keep must be a fraction in (0, 1], got {keep!r}")
    unit = width_unit(config)
    return max(unit, round(keep * config.N / unit) * unit)


def prune_state(
    config: BDHConfig, state: State, scores: Tensor, keep: float, name: str = "parent"
) -> tuple[BDHConfig, State]:
    """Keep the rotary pairs with the highest score summed over the pair and the heads.

    Neurons 2j and 2j+1 share a frequency and rotate together, so whole pairs are kept or
    dropped; and the model stores one frequency per neuron index for all heads, so every head
    keeps the same indices. Kept neurons stay in their order, so the heritage ranges only shrink.
    """
    nh, N = config.n_head, config.N
    if tuple(scores.shape) != (nh, N):
        raise MergeError(f"prune scores must have shape {(nh, N)}, got {tuple(scores.shape)}")
    n_keep = kept_count(config, keep)
    pairs = scores.reshape(nh, N // 2, 2).sum(dim=(0, 2))  # (N/2,)
    top = pairs.topk(n_keep // 2).indices.sort().values  # (n_keep/2,)
    index = torch.stack((2 * top, 2 * top + 1), dim=-1).flatten()  # (n_keep,) neuron indices
    parts = split_neurons(state, nh)
    pruned = join_neurons({k: t.index_select(1, index) for k, t in parts.items()})
    pruned |= {k: state[k].clone() for k in SHARED_TENSORS}
    heritage = [
        {**e, "ranges": [_shrink(r, index) for r in e["ranges"]]} for e in heritage_of(config, name)
    ]
    return _with_width(config, n_keep, heritage), pruned


def _shrink(span: list[int], index: Tensor) -> list[int]:
    """Where the neurons [a, b) of the old numbering land among the kept `index`."""
    a, b = span
    before = int((index < a).sum())
    return [before, before + int(((index >= a) & (index < b)).sum())]


def prune_model(model: BDH, keep: float, scores: Tensor | None = None) -> BDH:
    """Prune by `scores` (nh, N), by default the decoder row norms."""
    state = model.state_dict()
    if scores is None:
        scores = decoder_norm_scores(model.config, state)
    config, pruned = prune_state(model.config, state, scores, keep)
    return _build(config, pruned)


# ---------------------------------------------------------------------------- checkpoints


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _check_out(out: str | Path, inputs: Sequence[str | Path]) -> None:
    for path in inputs:
        if _same_path(out, path) or _same_path(out, resolve_checkpoint(path)):
            raise MergeError(f"the output {out} is also an input; write to a new path")


def _load_bdh(path: str | Path) -> Checkpoint:
    ckpt = load_checkpoint(path)
    if ckpt.kind != "bdh":
        raise MergeError(f"{path} holds a {ckpt.kind} model; only BDH models have neurons to merge")
    return ckpt


def _check_tokenizers(ckpts: Sequence[Checkpoint], names: Sequence[str]) -> None:
    first = ckpts[0].tokenizer
    for ckpt, name in zip(ckpts[1:], names[1:], strict=True):
        if (ckpt.tokenizer.kind, ckpt.tokenizer.fingerprint) != (first.kind, first.fingerprint):
            raise MergeError(
                f"cannot merge {names[0]} and {name}: their tokenizers differ"
                f" ({first.kind} vs {ckpt.tokenizer.kind})"
            )


def merge_checkpoints(
    paths: Sequence[str | Path],
    out: str | Path,
    base: str | Path | None = None,
    shared: str = "mean",
) -> Path:
    """Merge the BDH checkpoints at `paths` into a new checkpoint at `out`.

    Every input is loaded and checked (compatible shapes and tokenizers, `out` not an input)
    before anything is written.
    """
    inputs = [*paths, *([base] if base is not None else [])]
    _check_out(out, inputs)
    ckpts = [_load_bdh(p) for p in inputs]
    names = [str(p) for p in inputs]
    check_compatible([c.config for c in ckpts], names)
    _check_tokenizers(ckpts, names)
    parents, base_ckpt = ckpts[: len(paths)], (ckpts[-1] if base is not None else None)
    config, state = merge_states(
        [c.config for c in parents], [c.model.state_dict() for c in parents], names[: len(paths)],
        (base_ckpt.config, base_ckpt.model.state_dict()) if base_ckpt else None, shared,
    )  # fmt: skip
    meta = {"merge": {"parents": names[: len(paths)], "base": names[-1] if base else None,
                      "shared": shared}}  # fmt: skip
    return save_checkpoint(out, _build(config, state), "bdh", parents[0].tokenizer, meta)


def grow_checkpoint(
    path: str | Path, out: str | Path, K: int, scale: float = GROW_SCALE, seed: int = 0
) -> Path:
    """Write the checkpoint at `path` grown by K neurons per head to `out`."""
    _check_out(out, [path])
    ckpt = _load_bdh(path)
    generator = torch.Generator().manual_seed(seed)
    config, state = grow_state(
        ckpt.config, ckpt.model.state_dict(), K, scale, generator, name=str(path)
    )
    meta = {"grow": {"parent": str(path), "add_neurons": K, "scale": scale, "seed": seed}}
    return save_checkpoint(out, _build(config, state), "bdh", ckpt.tokenizer, meta)


PRUNE_BY = ("decoder", "firing")


def prune_checkpoint(
    path: str | Path,
    out: str | Path,
    keep: float,
    by: str = "decoder",
    data: str | None = None,
    max_tokens: int = 65_536,
) -> Path:
    """Write the checkpoint at `path`, pruned to a fraction `keep` of its neurons, to `out`.

    by="decoder" scores neurons by their decoder row norm; by="firing" by how often they fire on
    the first `max_tokens` tokens of the training split of `data` (a bdh.data source).
    """
    if by not in PRUNE_BY:
        raise MergeError(f"prune --by must be one of {', '.join(PRUNE_BY)}, got {by!r}")
    if by == "firing" and data is None:
        raise MergeError("prune --by firing needs --data SOURCE (the text the neurons fire on)")
    _check_out(out, [path])
    ckpt = _load_bdh(path)
    kept_count(ckpt.config, keep)  # a bad fraction fails before the data is read
    state = ckpt.model.state_dict()
    if by == "firing":
        tokens = _corpus_tokens(data, ckpt.tokenizer, ckpt.config.vocab_size, max_tokens)
        block = int(ckpt.meta.get("train", {}).get("block_size", 256))
        scores = firing_rate_scores(ckpt.model, tokens, block)
    else:
        scores = decoder_norm_scores(ckpt.config, state)
    config, pruned = prune_state(ckpt.config, state, scores, keep, name=str(path))
    meta = {"prune": {"parent": str(path), "keep": keep, "by": by, "data": data,
                      "neurons_per_head": config.N}}  # fmt: skip
    return save_checkpoint(out, _build(config, pruned), "bdh", ckpt.tokenizer, meta)


def _corpus_tokens(source: str, tokenizer: Any, vocab_size: int, max_tokens: int) -> Tensor:
    from bdh import data as bdh_data

    if max_tokens < 1:
        raise MergeError(f"--max-tokens must be >= 1, got {max_tokens}")
    corpus = bdh_data.load_corpus(source)
    tokens = bdh_data.tokenize_cached(corpus.train, tokenizer)[:max_tokens]
    bdh_data.check_tokens(tokens, 1, vocab_size, f"the train split of {source}")
    return torch.from_numpy(tokens.astype("int64"))
