"""Sparsity statistics: the streamed counters against the same statistics computed at once on
every activation, and the corpus pass and `bdh inspect sparsity` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.checkpoint import load_checkpoint, save_checkpoint
from bdh.cli import build_parser, main
from bdh.interpret.sparsity import SparsityStats, measure_sparsity, untrained_twin
from bdh.tokenizer import ByteTokenizer
from conftest import synthetic_text

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


# ---------------------------------------------------------------- on a model and a checkpoint


def literal_activations(model, idx):
    """x and y of every layer, written like `bdh.reference` (full masked product, rotary phases
    from their definition), independently of `bdh.model` and its capture."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    enc, enc_v, dec, freqs = sd["encoder"], sd["encoder_v"], sd["decoder"], sd["attn.freqs"]
    B, T = idx.shape
    ln = lambda z: torch.nn.functional.layer_norm(z, (z.shape[-1],), eps=1e-5)  # noqa: E731
    phases = (torch.arange(T, dtype=freqs.dtype).view(1, 1, -1, 1) * freqs % 1) * 2 * np.pi
    v = ln(sd["embed.weight"][idx].unsqueeze(1))
    out = []
    for _ in range(model.config.n_layer):
        x = torch.relu(v @ enc)
        swapped = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).view(x.shape)
        q = x * torch.cos(phases) + swapped * torch.sin(phases)
        y = x * torch.relu(ln((q @ q.mT).tril(-1) @ v) @ enc_v)
        out.append((x, y))
        v = ln(v + ln(y.transpose(1, 2).reshape(B, 1, T, -1) @ dec))
    return out


def test_measured_over_windows_equals_counting_a_literal_forward_pass():
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None)).double()
    tokens = np.random.default_rng(0).integers(0, 256, 16 * 5 + 7)
    stats = measure_sparsity(model, tokens, block_size=16, batch_size=2)
    want = SparsityStats(model.config.n_layer, model.config.n_head, model.config.N)
    windows = [torch.as_tensor(tokens[s : s + 16])[None] for s in range(0, len(tokens), 16)]
    for idx in windows:  # one window at a time, the 7-token tail included
        for layer, (x, y) in enumerate(literal_activations(model, idx)):
            want.update(layer, x, y)
    assert stats.to_dict(neurons=True) == want.to_dict(neurons=True)
    assert int(stats.tokens[0]) == len(tokens)
    assert 0 < stats.to_dict()["layers"][1]["y"]["density"] < 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint, not at its initial weights, that names its data, block and seed."""
    root = tmp_path_factory.mktemp("sparsity")
    data = root / "corpus.txt"
    data.write_text(synthetic_text(3_000))
    torch.manual_seed(5)
    model = BDH(BDHConfig.from_name("tiny", damping=None))
    torch.manual_seed(6)
    model.reset_parameters()  # not the weights seed 5 draws: "trained" ≠ untrained
    meta = {"train": {"data": str(data), "block_size": 32, "seed": 5}}
    return save_checkpoint(root / "ckpt", model, "bdh", ByteTokenizer(), meta=meta)


def test_inspect_sparsity_prints_a_table_json_and_a_plot(ckpt, tmp_path, capsys):
    assert main(["inspect", "sparsity", "--ckpt", str(ckpt), "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "| trained | 1 |" in out and "200 tokens" in out
    png = tmp_path / "s.png"
    argv = ["inspect", "sparsity", "--ckpt", str(ckpt), "--json", "--plot", str(png)]
    assert main([*argv, "--max-tokens", "100"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 0
    assert trained["measured"]["block_size"] == 32 and trained["layers"][0]["tokens"] == 100
    assert main([*argv, "--max-tokens", "100", "--untrained"]) == 0
    untrained = json.loads(capsys.readouterr().out)
    assert untrained["measured"]["model"] == "untrained"
    assert untrained["layers"][0]["x"] != trained["layers"][0]["x"]


def test_the_untrained_twin_has_the_weights_the_seed_draws(ckpt):
    torch.manual_seed(5)
    fresh = BDH(BDHConfig.from_name("tiny", damping=None))
    twin = untrained_twin(load_checkpoint(ckpt))
    for (name, a), b in zip(fresh.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--ckpt", "nowhere"], "checkpoint not found"),
        (["--max-tokens", "0"], "max_tokens must be ≥ 1"),
        (["--data", "missing.txt"], "data source not found"),
        (["--block-size", "0"], "block_size"),
    ],
)
def test_inspect_mistakes_are_one_line(ckpt, capsys, argv, expected):
    argv = ["inspect", "sparsity", *(["--ckpt", str(ckpt)] if "--ckpt" not in argv else []), *argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.slow
def test_the_benchmark_script_writes_both_models(ckpt, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(REPO / "benchmarks" / "sparsity.py"), "--checkpoint", str(ckpt)]
    argv += ["--max-tokens", "64", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "machine:" in done.stdout
    result = json.loads((tmp_path / "sparsity.json").read_text())
    assert set(result["results"]) == {"trained", "untrained"}
    assert len(result["results"]["trained"]["layers"][0]["x"]["fired"]) == 256


@pytest.mark.parametrize("argv", [["inspect", "sparsity"], ["experiment", "surprisal"]])
def test_every_option_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    parser = build_parser()
    for word in argv:  # walk down the subcommands
        parser = next(a for a in parser._actions if a.dest in ("verb", "what", "experiment"))
        parser = parser.choices[word]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in out
        if action.option_strings and action.dest != "help":
            assert action.help, f"{argv} {action.option_strings} has no help"
