"""The surprisal experiment: its per-token observations against independent computations, its
statistics against their textbook forms, and `bdh experiment surprisal --quick` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from bdh import BDH, BDHConfig
from bdh.checkpoint import save_checkpoint
from bdh.cli import main
from bdh.experiments import surprisal as exp
from bdh.tokenizer import ByteTokenizer
from conftest import synthetic_text
from test_sparsity import literal_activations


def test_token_profile_equals_the_loss_and_a_literal_forward_pass():
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None)).double()
    windows = torch.randint(0, 256, (5, 12))
    prof = exp.token_profile(model, windows, batch_size=2)
    logits, _ = model(windows)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    assert np.isnan(prof["surprisal"][:, 0]).all()
    np.testing.assert_allclose(prof["surprisal"][:, 1:], loss.view(5, 11).detach(), atol=1e-12)
    N = model.config.N
    for layer, (x, y) in enumerate(literal_activations(model, windows)):
        np.testing.assert_array_equal(prof["x"][layer], (x > 0).double().mean((1, 3)).numpy())
        np.testing.assert_array_equal(prof["y"][layer], (y > 0).double().mean((1, 3)).numpy())
        for g in range(exp.GROUPS):  # group g: neurons g·N/8 .. (g+1)·N/8 − 1 of every head
            part = y[..., g * N // exp.GROUPS : (g + 1) * N // exp.GROUPS]
            want = (part > 0).double().mean((1, 3)).numpy()
            np.testing.assert_array_equal(prof["y_groups"][layer, g], want)


def test_frequency_groups_span_a_factor_of_four_of_periods_each():
    periods = np.array(exp.group_periods(480))
    assert (periods[1:, 0] > periods[:-1, 1]).all()  # slower and slower, no overlap
    np.testing.assert_allclose(periods[1:, 0] / periods[:-1, 0], 4.0, rtol=1e-5)  # θ^(1/8)


def test_partial_spearman_is_the_correlation_of_rank_residuals():
    rng = np.random.default_rng(0)
    pos = np.tile(np.arange(30), 40)
    a = rng.normal(size=pos.size) - 0.1 * pos
    b = rng.normal(size=pos.size) - 0.05 * pos + 0.3 * a
    r = [stats.rankdata(v) for v in (a, b, pos)]
    resid = [v - np.polyval(np.polyfit(r[2], v, 1), r[2]) for v in r[:2]]
    want = np.corrcoef(*resid)[0, 1]
    got = exp.spearman_by_windows(a.reshape(40, 30), b.reshape(40, 30), 20, rng)
    assert got["partial_rho_given_position"] == pytest.approx(want, abs=1e-12)
    assert got["rho"] == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert got["ci95"][0] < got["rho"] < got["ci95"][1]


def test_weighted_spearman_equals_scipy_on_the_repeated_sample():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 7, 300) / 7  # densities: many ties
    b = np.round(rng.exponential(size=300), 1) + 0.2 * a
    weight = rng.integers(0, 4, 300)  # how often a resample repeats each item
    inv = [np.unique(v, return_inverse=True)[1] for v in (a, b)]
    want = stats.spearmanr(np.repeat(a, weight), np.repeat(b, weight)).statistic
    assert exp.weighted_spearman(*inv, weight) == pytest.approx(want, abs=1e-12)


def test_memorisation_and_repetition_are_the_first_and_later_presentations():
    W, L, T = 6, 2, exp.WARMUP + exp.WORD * exp.REPEATS
    y = np.full((L, W, T), 0.02)
    y[:, :, exp.WARMUP : exp.WARMUP + exp.WORD] = 0.05  # busier during the first presentation
    y[1] = 0.03  # layer 1: flat
    y[1, :, 0] = 0.9  # the warm-up is in neither window
    prof = {"y": y, "y_groups": np.repeat(y[:, None], exp.GROUPS, 1),
            "surprisal": np.linspace(3, 1, T)[None].repeat(W, 0)}  # fmt: skip
    f = exp._fig14(prof)
    assert f["layers"][0]["ratio"] == pytest.approx(2.5)
    assert f["layers"][0]["words_higher_when_memorising"] == W
    assert f["layers"][1]["ratio"] == pytest.approx(1.0)
    assert f["loss_per_presentation"] == sorted(f["loss_per_presentation"], reverse=True)


def test_french_sentences_are_distinct_and_drawn_from_the_whole_file(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    rows = [f"e{i}\tf{i:03d}" for i in range(300)] + ["dup\tf000", "bad line"]
    tsv.write_text("\n".join(rows) + "\n")
    text = exp.french_text(tsv, 200, np.random.default_rng(0)).decode()
    lines = text.split("\n")
    assert len(lines) == len(set(lines)) == 40  # 5 bytes a line: 200 bytes
    assert set(lines) <= {f"f{i:03d}" for i in range(300)}
    assert max(int(x[1:]) for x in lines) > 150  # not the head of the file


def test_experiment_quick_end_to_end(tmp_path, capsys):
    data, ood = tmp_path / "corpus.txt", tmp_path / "other.txt"
    data.write_text(synthetic_text(20_000))
    ood.write_text(synthetic_text(20_000, seed=1).upper())
    torch.manual_seed(3)
    model = BDH(BDHConfig.from_name("tiny", damping=None))
    meta = {"train": {"data": str(data), "block_size": 32, "seed": 3}}
    ckpt = save_checkpoint(tmp_path / "ckpt", model, "bdh", ByteTokenizer(), meta=meta)
    out = tmp_path / "out"
    argv = ["experiment", "surprisal", "--ckpt", str(ckpt), "--quick", "--ood", str(ood)]
    assert main([*argv, "--out", str(out), "--tokens", "512", "--words", "5"]) == 0
    payload = json.loads((out / "surprisal-quick.json").read_text())
    trained = payload["models"]["trained"]
    assert len(trained["correlation"]) == model.config.n_layer
    assert set(trained["domains"]) == {"in-domain (held out)", "out-of-domain (other.txt)",
                                       "shuffled held-out"}  # fmt: skip
    assert trained["domains"]["shuffled held-out"]["windows"] == 512 // 32
    assert len(trained["fig14"]["y_over_time"][0]) == 77 and trained["fig14"]["words"] == 5
    assert "untrained" in payload["models"]
    for name in ("surprisal-quick.md", "fig14a.png", "fig14b.png"):
        assert (out / name).stat().st_size > 0
    assert "Spearman" in capsys.readouterr().out


def test_experiment_mistakes_are_one_line(tmp_path, capsys):
    argv = ["experiment", "surprisal", "--ckpt", str(tmp_path / "none"), "--quick"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]
