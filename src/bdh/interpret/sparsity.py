"""How sparse BDH's neurons are (paper §4.1: ~5% of x active), streamed over a corpus.

Notation: B batch, T tokens, L layers, nh heads, N neurons per head, n = nh·N.

`SparsityStats` keeps only counters: per layer and neuron how many tokens made x and y fire
(L, nh, N), and per layer a histogram of how many of the n neurons fired on one token (L, n + 1).
Memory is O(n·L) whatever the number of tokens. From them: the fraction of x and y that is
non-zero per layer and head, each neuron's firing rate, dead neurons (never fired) and always-on
ones (fired on every token), and the distribution of active counts per token.

`measure_sparsity` reads tokens in consecutive windows (each from an empty state, as in training
and `bdh eval`) and observes x and y through `model.run_with_cache`: the model is not changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bdh.figures import save_figure

KINDS = ("x", "y")


@dataclass
class SparsityStats:
    """Counters of firing neurons; `update` once per layer and batch of activations."""

    n_layer: int
    n_head: int
    N: int
    tokens: Tensor = field(init=False)  # (L,) tokens seen per layer
    fired: dict[str, Tensor] = field(init=False)  # kind → (L, nh, N) tokens on which it fired
    active: dict[str, Tensor] = field(init=False)  # kind → (L, n + 1) histogram of active counts

    def __post_init__(self) -> None:
        L, nh, N = self.n_layer, self.n_head, self.N
        self.tokens = torch.zeros(L, dtype=torch.long)
        self.fired = {k: torch.zeros(L, nh, N, dtype=torch.long) for k in KINDS}
        self.active = {k: torch.zeros(L, nh * N + 1, dtype=torch.long) for k in KINDS}

    @property
    def n(self) -> int:
        return self.n_head * self.N

    def update(self, layer: int, x: Tensor, y: Tensor) -> None:
        """Count the firing in x and y (B, nh, T, N) of `layer`."""
        self.tokens[layer] += x.shape[0] * x.shape[2]
        for kind, act in (("x", x), ("y", y)):
            on = act.detach() > 0
            self.fired[kind][layer] += on.sum((0, 2)).cpu()
            per_token = on.sum((1, 3)).flatten().cpu()  # (B·T,) active among all n neurons
            self.active[kind][layer] += torch.bincount(per_token, minlength=self.n + 1)

    # ------------------------------------------------------------------ what the counters say
    def density(self, kind: str) -> Tensor:
        """Fraction of (token, neuron) pairs that fired, per layer and head: (L, nh)."""
        return self.fired[kind].sum(-1).double() / (self.tokens[:, None] * self.N).clamp(min=1)

    def firing_rate(self, kind: str) -> Tensor:
        """Fraction of tokens on which each neuron fired: (L, nh, N)."""
        return self.fired[kind].double() / self.tokens[:, None, None].clamp(min=1)

    def dead(self, kind: str) -> Tensor:
        """Neurons that never fired, per layer: (L,)."""
        return (self.fired[kind] == 0).sum((1, 2))

    def always_on(self, kind: str) -> Tensor:
        """Neurons that fired on every token, per layer: (L,)."""
        return (self.fired[kind] == self.tokens[:, None, None]).sum((1, 2))

    def active_quantiles(self, kind: str, qs: tuple[float, ...] = (0.1, 0.5, 0.9)) -> Tensor:
        """Quantiles of the number of active neurons per token, per layer: (L, len(qs))."""
        cdf = self.active[kind].cumsum(-1).double() / self.tokens[:, None].clamp(min=1)
        return torch.stack([(cdf < q).sum(-1) for q in qs], dim=-1)

    def to_dict(self, neurons: bool = False) -> dict[str, Any]:
        """Per-layer summary; with `neurons`, every neuron's count of tokens it fired on too
        ("fired", n integers per layer and kind, head-major: its firing rate over "tokens")."""
        layers = []
        for layer in range(self.n_layer):
            row: dict[str, Any] = {"layer": layer, "tokens": int(self.tokens[layer])}
            for kind in KINDS:
                d = self.density(kind)[layer]
                counts = self.active[kind][layer].double()
                mean = float((counts * torch.arange(self.n + 1)).sum() / counts.sum().clamp(min=1))
                p10, p50, p90 = (int(v) for v in self.active_quantiles(kind)[layer])
                row[kind] = {
                    "density": float(self.fired[kind][layer].sum())
                    / max(1, self.n * int(self.tokens[layer])),
                    "density_per_head": [float(v) for v in d],
                    "dead": int(self.dead(kind)[layer]),
                    "always_on": int(self.always_on(kind)[layer]),
                    "active_per_token": {"mean": mean, "p10": p10, "median": p50, "p90": p90},
                }
                if neurons:
                    row[kind]["fired"] = self.fired[kind][layer].flatten().tolist()
            layers.append(row)
        return {
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "N": self.N,
            "n": self.n,
            "layers": layers,
        }


# ---------------------------------------------------------------------------- over a corpus


@torch.no_grad()
def measure_sparsity(
    model: Any,
    tokens: np.ndarray | Tensor,
    block_size: int,
    batch_size: int = 16,
    progress: bool = False,
) -> SparsityStats:
    """Stream `tokens` through the model in windows of block_size and count x and y firing."""
    c = model.config
    stats = SparsityStats(c.n_layer, c.n_head, c.N)
    names = [f"layers.{l}.{k}" for l in range(c.n_layer) for k in KINDS]
    was_training = model.training
    model.eval()
    try:
        for idx in _windows(tokens, block_size, batch_size, progress):
            _, cache = model.run_with_cache(idx, names=names)
            for layer in range(c.n_layer):
                stats.update(layer, cache["x", layer], cache["y", layer])
    finally:
        model.train(was_training)
    return stats


def _windows(
    tokens: np.ndarray | Tensor, block_size: int, batch_size: int, progress: bool
) -> Iterator[Tensor]:
    """Consecutive (≤ batch_size, block_size) windows of the tokens, then the shorter tail."""
    from tqdm.auto import tqdm

    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be ≥ 1, got {block_size}, {batch_size}")
    if isinstance(tokens, Tensor):
        ids = tokens.reshape(-1).long()
    else:
        ids = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a copy: caches are read-only
    if ids.numel() == 0:
        raise ValueError("no tokens to measure")
    full = ids.numel() // block_size
    rows = ids[: full * block_size].view(full, block_size)
    for start in tqdm(
        range(0, full, batch_size), desc="sparsity", disable=not progress, leave=False
    ):
        yield rows[start : start + batch_size]
    if ids.numel() % block_size:
        yield ids[full * block_size :][None]


# ---------------------------------------------------------------------------- report


def table_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per (model, layer): x and y density (overall and per head), dead and always-on
    neurons, and the median number of active neurons per token."""
    lines = [
        "| model | layer | x density | y density | x by head | y by head | dead x | dead y"
        " | always-on x | active x / token | active y / token |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in results.items():
        n = summary["n"]
        for row in summary["layers"]:
            x, y = row["x"], row["y"]
            heads = {k: " / ".join(f"{v:.1%}" for v in row[k]["density_per_head"]) for k in KINDS}
            lines.append(
                f"| {name} | {row['layer']} | {x['density']:.2%} | {y['density']:.2%}"
                f" | {heads['x']} | {heads['y']} | {x['dead']} / {n} | {y['dead']} / {n}"
                f" | {x['always_on']} | {x['active_per_token']['median']}"
                f" | {y['active_per_token']['median']} |"
            )
    return "\n".join(lines) + "\n"


def plot(stats: SparsityStats, path: str | Path, title: str = "") -> Path:
    """Per layer: histograms of neuron firing rates and of active neurons per token (x and y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, stats.n_layer, figsize=(4 * stats.n_layer, 6), squeeze=False)
    bins = np.logspace(-5, 0, 41)
    for layer in range(stats.n_layer):
        top, bottom = axes[0, layer], axes[1, layer]
        for kind in KINDS:
            rate = stats.firing_rate(kind)[layer].flatten().numpy()
            dead = int((rate == 0).sum())
            top.hist(np.clip(rate, 1e-5, 1), bins=bins, alpha=0.6, label=f"{kind} ({dead} dead)")
            counts = stats.active[kind][layer].numpy()
            bottom.plot(np.arange(counts.size) / stats.n, counts / max(1, counts.sum()), label=kind)
        top.set(
            xscale="log", title=f"layer {layer}", xlabel="firing rate of a neuron", ylabel="neurons"
        )
        bottom.set(
            xscale="log",
            xlabel="fraction of the n neurons active on a token",
            ylabel="fraction of tokens",
        )
        top.legend()
        bottom.legend()
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------- a checkpoint


def checkpoint_tokens(
    ckpt: Any, data: str | None, split: str | None, max_tokens: int | None
) -> tuple[np.ndarray, dict[str, str]]:
    """The tokens `bdh eval` would score: the validation split of the checkpoint's training data,
    or `data` (a file whole, a folder or named corpus on its validation split); the first
    max_tokens of them. Returns the tokens and what they are."""
    from bdh import data as bdh_data

    if max_tokens is not None and max_tokens < 1:
        raise bdh_data.DataError(f"max_tokens must be ≥ 1, got {max_tokens}")
    source = data or ckpt.meta.get("train", {}).get("data")
    if source is None:
        raise bdh_data.DataError("the checkpoint does not name its data; pass --data SOURCE")
    if split is None:
        split = "all" if data is not None and Path(data).is_file() else "val"
    text = bdh_data.load_corpus(source).split(split)
    if not text:
        raise bdh_data.DataError(f"the {split} split of {source} is empty")
    tokens = bdh_data.tokenize_cached(text, ckpt.tokenizer)
    bdh_data.check_tokens(tokens, 1, ckpt.config.vocab_size, f"the {split} split of {source}")
    return np.asarray(tokens[:max_tokens]), {"data": source, "split": split}


def untrained_twin(ckpt: Any, seed: int | None = None) -> Any:
    """The checkpoint's model as it was before training: same config, weights drawn the way
    `bdh train` draws them with its seed (or `seed`)."""
    from bdh.checkpoint import model_kind

    seed = seed if seed is not None else int(ckpt.meta.get("train", {}).get("seed", 0))
    with torch.random.fork_rng():  # the caller's random stream is left as it was
        torch.manual_seed(seed)  # the trainer seeds torch with its seed right before building
        return model_kind(ckpt.kind).build(ckpt.config)


def sparsity_of_checkpoint(
    path: str | Path,
    data: str | None = None,
    split: str | None = None,
    max_tokens: int | None = None,
    block_size: int | None = None,
    untrained: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[SparsityStats, dict[str, Any]]:
    """Sparsity of a checkpoint's model (or its untrained twin) on its held-out text.

    Windows are the training block size unless `block_size` is given: activity depends on how
    much context a token has. Returns the statistics and what was measured.
    """
    from bdh.checkpoint import load_checkpoint
    from bdh.train import choose_threads

    torch.set_num_threads(choose_threads())
    ckpt = load_checkpoint(path)
    if ckpt.kind != "bdh":
        raise ValueError(f"{ckpt.path} holds a {ckpt.kind} model; sparsity is measured on BDH")
    tokens, what = checkpoint_tokens(ckpt, data, split, max_tokens)
    trained_block = int(ckpt.meta.get("train", {}).get("block_size", 256))
    block = trained_block if block_size is None else block_size
    model = untrained_twin(ckpt) if untrained else ckpt.model
    stats = measure_sparsity(model, tokens, block, batch_size, progress)
    what |= {
        "checkpoint": str(ckpt.path),
        "model": "untrained" if untrained else "trained",
        "block_size": block,
        "tokens": int(stats.tokens[0]),
    }
    return stats, what
