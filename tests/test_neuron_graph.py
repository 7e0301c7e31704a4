"""The neuron graph G = D_x E (bdh.interpret.neuron_graph and `bdh experiment neuron-graph`).

Each test compares two forms of one quantity: the blockwise scan against the dense product, the
tail rule on samples against the same rule on the exact distribution, Louvain on a planted
partition against random graphs with the same edge count, the untrained twin against the
trainer's own initialisation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import brentq

from bdh.cli import main
from bdh.config import BDHConfig
from bdh.experiments import neuron_graph as exp
from bdh.interpret import neuron_graph as ng
from bdh.model import BDH

pytest.importorskip("networkx")


def _dyadic_model(seed: int = 0) -> BDH:
    """A tiny BDH whose weights are multiples of 1/8 in [-1/2, 1/2]: every product and sum below
    is exact in fp32, whatever order the matrix product adds in."""
    model = BDH(BDHConfig.from_name("tiny"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.decoder, model.encoder, model.encoder_v):
            p.copy_(torch.randint(-4, 5, p.shape, generator=g).float() / 8)
    return model


def _dense_G(model: BDH, which: str) -> torch.Tensor:
    """The whole (nh·N, nh·N) matrix E · D, rows = source neurons, columns = target neurons."""
    enc = model.encoder if which == "x" else model.encoder_v  # (nh, D, N)
    D_flat = enc.detach().permute(1, 0, 2).reshape(enc.shape[1], -1)  # (D, nh·N), head-major
    return model.decoder.detach() @ D_flat


@pytest.mark.parametrize("which", ng.MATRICES)
def test_blockwise_scan_equals_the_dense_product(which):
    model = _dyadic_model()
    f = ng.factors_of(model)
    nh, N = f.n_head, f.N
    full = _dense_G(model, which)
    grid = ng.Grid(h=0.25, K=64)  # 2K·h a power of two: bin edges exact too
    keep = 300
    for a in range(nh):
        for b in range(nh):
            A, B = f.block(which, a, b)
            block = full[b * N : (b + 1) * N, a * N : (a + 1) * N]  # head b → head a
            assert torch.equal(torch.cat([t for _, t in ng.tiles(A, B, rows=37)]), block)
            assert ng.rms(A, B) == pytest.approx(float(block.double().pow(2).mean().sqrt()))
            s = ng.scan(A, B, grid, keep, a == b, negatives=True, rows=37)  # 37 ∤ N
            w = block.double().numpy()
            counts, _ = np.histogram(np.clip(w, -16, 15.99), bins=grid.edges)
            assert np.array_equal(s.counts, counts)
            assert s.moments == pytest.approx([w.size, w.sum(), (w**2).sum(), (w**3).sum()])
            _check_top(s.top, w, keep, a == b)
            _check_top(s.bottom, -w, keep, a == b)


def _check_top(top, w, keep, diagonal):
    """The kept entries are the `keep` largest off-diagonal ones: same values, and every entry
    strictly above the smallest kept value is kept, at its own (i, j)."""
    i, j, v = top
    w = w.copy()
    if diagonal:
        np.fill_diagonal(w, -np.inf)
    expected = np.sort(w.ravel())[::-1][:keep]
    assert np.array_equal(v.astype(np.float64), expected)
    assert np.array_equal(w[i, j], v.astype(np.float64))
    above = set(zip(*np.nonzero(w > v[-1]), strict=True))
    assert above <= set(zip(i.tolist(), j.tolist(), strict=True))
    assert not diagonal or not np.any(i == j)


# ---------------------------------------------------------------------------- the tail rule


def _counts(samples: np.ndarray, grid: ng.Grid) -> np.ndarray:
    clipped = np.clip(samples, grid.edges[0], np.nextafter(grid.edges[-1], 0))
    return np.histogram(clipped, bins=grid.edges)[0]


def test_the_tail_rule_finds_a_planted_tail_where_the_exact_mixture_puts_it():
    rng = np.random.default_rng(0)
    n, share, mu, sd = 2_000_000, 0.02, 3.0, 0.7
    bulk = rng.standard_normal(int(n * (1 - share)))
    tail = rng.normal(mu, sd, int(n * share))
    grid = ng.Grid(h=0.02, K=500)
    beta = ng.tail_threshold(_counts(np.concatenate([bulk, tail]), grid), grid)

    # The same rule on the exact distribution: the x where the mass of [x, x + 5h) is twice
    # that of its mirror (−x − 5h, −x].
    def mass(lo, hi):
        bulk = stats.norm.cdf(hi) - stats.norm.cdf(lo)
        return (1 - share) * bulk + share * (
            stats.norm.cdf(hi, mu, sd) - stats.norm.cdf(lo, mu, sd)
        )

    w = 5 * grid.h
    exact = brentq(lambda x: mass(x, x + w) - 2 * mass(-x - w, -x), 0.01, 6)
    assert beta is not None
    assert abs(beta - exact) <= 0.06, (beta, exact)  # 3 bins: sampling and the grid's step
    # Control: the bulk alone, symmetric, has no tail at any threshold.
    assert ng.tail_threshold(_counts(bulk, grid), grid) is None


def test_the_tail_rule_ignores_a_negative_tail_and_a_handful_of_outliers():
    rng = np.random.default_rng(1)
    bulk = rng.standard_normal(1_000_000)
    grid = ng.Grid(h=0.02, K=500)
    negative = np.concatenate([bulk, rng.normal(-3, 0.7, 20_000)])
    assert ng.tail_threshold(_counts(negative, grid), grid) is None
    outliers = np.concatenate([bulk, np.full(50, 7.0)])  # fewer than min_count entries
    assert ng.tail_threshold(_counts(outliers, grid), grid) is None


# ---------------------------------------------------------------------------- modularity


def _planted(N: int = 400, k: int = 4, D: int = 32, strength: float = 4.0, seed: int = 0):
    """G = A @ B with G(i, j) = strength·[i and j in one of k groups] + N(0, D) noise."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(N) % k
    onehot = torch.nn.functional.one_hot(group, k).float()
    A = torch.cat([strength * math.sqrt(D) * onehot, torch.randn(N, D, generator=g)], 1)
    B = torch.cat([onehot.T, torch.randn(D, N, generator=g)], 0)
    return A, B


def test_a_planted_partition_is_modular_and_its_baselines_are_not():
    A, B = _planted()
    N = A.shape[0]
    grid = ng.make_grid(ng.rms(A, B), ng.entry_bound(A, B))
    s = ng.scan(A, B, grid, keep=N * N, diagonal=True)
    beta = ng.tail_threshold(s.counts, grid)
    assert beta is not None
    i, j, _ = exp.edges_at(s.top, beta)
    m = i.size
    assert m > 10 * N  # a dense graph: random graphs have little to find in it
    trained = ng.modularity(i, j, runs=3)
    gnm = ng.modularity(*ng.gnm_pairs(N, m, True, np.random.default_rng(0)), runs=3)
    P1, P2 = ng.lowrank_factors(N, 32, seed=0)
    lr = ng.scan(P1, P2, ng.make_grid(ng.rms(P1, P2), ng.entry_bound(P1, P2)), m, True)
    li, lj, _ = exp.top_m(lr.top, m)
    lowrank = ng.modularity(li, lj, runs=3)
    assert trained.q > 0.6 and trained.communities == 4
    assert gnm.q < 0.15 and lowrank.q < 0.15
    assert li.size == m and gnm.edges == m


def test_both_louvain_backends_score_with_the_same_formula():
    import networkx as nx

    A, B = _planted(N=200, strength=2.0)
    G = (A @ B).numpy()
    i, j = np.nonzero(G > np.quantile(G, 0.9))
    adj = ng.adjacency(i, j)
    labels = np.arange(adj.shape[0]) % 3
    graph = nx.from_scipy_sparse_array(adj)
    comms = [set(np.nonzero(labels == c)[0].tolist()) for c in range(3)]
    assert ng.newman_modularity(adj, labels) == pytest.approx(nx.community.modularity(graph, comms))
    results = {b: ng.modularity(i, j, runs=2, backend=b).q for b in ng.backends()}
    assert max(results.values()) - min(results.values()) < 0.02, results


# ---------------------------------------------------------------------------- the experiment


def test_the_untrained_twin_is_the_trainers_initialisation(tmp_path, text_file):
    from bdh.checkpoint import load_checkpoint
    from bdh.train import TrainConfig, train

    cfg = TrainConfig(
        data=str(text_file), out=str(tmp_path / "run"), preset="tiny", max_steps=1,
        batch_size=2, block_size=8, warmup_steps=0, lr=1e-9, threads=1, seed=7,
        eval_interval=1, eval_batches=1,
    )  # fmt: skip
    train(cfg, progress=False, log=lambda _: None)
    ckpt = load_checkpoint(tmp_path / "run")
    seed, source = exp.init_seed(ckpt.meta, None)
    assert (seed, source) == (7, "checkpoint")
    twin, other = exp.untrained(ckpt.config, seed), exp.untrained(ckpt.config, seed + 1)
    for name, p in ckpt.model.named_parameters():
        assert torch.allclose(dict(twin.named_parameters())[name], p, atol=1e-6), name
        assert not torch.allclose(dict(other.named_parameters())[name], p, atol=1e-3), name


def test_the_experiment_writes_its_numbers_and_figures(tmp_path):
    from bdh.checkpoint import save_checkpoint
    from bdh.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny"))
    meta = {"train": {"seed": 0}}  # the checkpoint is its own initialisation
    save_checkpoint(tmp_path / "ck", model, "bdh", load_tokenizer("bytes", None), meta)
    rc = main(
        ["experiment", "neuron-graph", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path),
         "--runs", "1", "--sweep-points", "3", "--max-edges", "4096"]
    )  # fmt: skip
    assert rc == 0
    payload = json.loads((tmp_path / "neuron-graph-ck.json").read_text())
    for which in ng.MATRICES:
        res = payload["matrices"][which]
        assert len(res["blocks"]) == 4 and len(res["heads"]) == 2
        assert res["beta_rule"].startswith("no tail") and res["untrained_beta_units"] is None
        for row in res["blocks"]:  # the twin is this very model: the same edges, the same Q
            assert row["untrained"]["q"] == row["trained"]["q"] > 0
    for fig in ("fig9a", "fig9b", "fig10"):
        assert (tmp_path / f"neuron-graph-ck-{fig}.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "extra, message",
    [([], "checkpoint not found"), (["--runs", "0"], "runs must be >= 1"),
     (["--backend", "igraph"], "backend must be one of")],
)  # fmt: skip
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, extra, message):
    rc = main(["experiment", "neuron-graph", "--ckpt", str(tmp_path / "nope"), *extra])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_kept_entries_never_include_the_masked_diagonal():
    model = _dyadic_model(1)
    A, B = ng.factors_of(model).block("x", 0, 0)
    N = A.shape[0]
    s = ng.scan(A, B, ng.Grid(h=0.25, K=64), keep=N * N, diagonal=True, rows=50)
    i, j, w = s.top
    assert i.size == N * (N - 1) and not np.any(i == j) and np.all(np.isfinite(w))
    with pytest.raises(ValueError, match="distinct pairs"):
        ng.gnm_pairs(N, N * (N - 1) + 1, True, np.random.default_rng(0))
