"""Sparsity statistics: the streamed counters against the same statistics computed at once on
every activation, and the corpus pass and `bdh inspect sparsity` on a tiny model."""

from __future__ import annotations

import numpy as np
import torch

from bdh.interpret.sparsity import SparsityStats

L, nh, N = 2, 3, 8


def _batches(seed=0, sizes=((2, 5), (3, 7), (1, 4))):
    """Sparse non-negative x and y (B, nh, T, N) per layer, for batches of several shapes; neuron
    0 of head 0 never fires and neuron 1 of head 0 always fires in x."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in sizes:
        xs = torch.relu(torch.randn(L, B, nh, T, N, generator=g) - 0.8)
        xs[:, :, 0, :, 0] = 0.0
        xs[:, :, 0, :, 1] = 1.0
        ys = xs * (torch.rand(L, B, nh, T, N, generator=g) < 0.5)
        out.append((xs, ys))
    return out


def test_streamed_counters_equal_the_statistics_of_all_tokens_at_once():
    batches = _batches()
    stats = SparsityStats(L, nh, N)
    for xs, ys in batches:
        for layer in range(L):
            stats.update(layer, xs[layer], ys[layer])
    for kind, k in (("x", 0), ("y", 1)):
        # every token of every batch as rows: (L, tokens, nh, N)
        every = torch.cat([b[k].permute(0, 1, 3, 2, 4).flatten(1, 2) for b in batches], dim=1)
        on = (every > 0).double()
        torch.testing.assert_close(stats.density(kind), on.mean((1, 3)), rtol=0, atol=1e-12)
        rate = on.mean(1)  # (L, nh, N)
        torch.testing.assert_close(stats.firing_rate(kind), rate, rtol=0, atol=1e-12)
        assert stats.dead(kind).tolist() == (rate == 0).sum((1, 2)).tolist()
        assert stats.always_on(kind).tolist() == (rate == 1).sum((1, 2)).tolist()
        per_token = on.sum((2, 3)).long()  # (L, tokens)
        for layer in range(L):
            want = np.quantile(per_token[layer].numpy(), [0.1, 0.5, 0.9], method="inverted_cdf")
            assert stats.active_quantiles(kind)[layer].tolist() == want.tolist()
            hist = torch.bincount(per_token[layer], minlength=nh * N + 1)
            assert torch.equal(stats.active[kind][layer], hist)
    assert stats.dead("x").min() >= 1 and stats.always_on("x").min() >= 1


def test_counters_do_not_depend_on_how_tokens_are_batched():
    one = SparsityStats(L, nh, N)
    for xs, ys in _batches():
        for layer in range(L):
            one.update(layer, xs[layer], ys[layer])
    other = SparsityStats(L, nh, N)
    for xs, ys in _batches():
        for layer in range(L):  # the same tokens, one sequence at a time
            for b in range(xs.shape[1]):
                other.update(layer, xs[layer, b : b + 1], ys[layer, b : b + 1])
    assert one.to_dict() == other.to_dict()
