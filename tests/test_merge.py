"""Merging, growing and pruning along the neuron axis: each checked against a second form of the
same computation (the parent's logits, the parents' own neurons, hand-combined tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdh import merge
from bdh.checkpoint import load_checkpoint, save_checkpoint
from bdh.cli import main
from bdh.config import BDHConfig
from bdh.model import BDH
from bdh.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int, std: float = 0.3, **changes) -> BDH:
    """A tiny BDH with weights of the given spread, in eval mode.

    The LayerNorms cancel a merge's doubled sums only while the normalised variance is well
    above their eps (1e-5); at the N(0, 0.02²) init of a tiny model the decoder's output is below
    it, so the self-merge tests use larger weights, as a trained model has.
    """
    torch.manual_seed(seed)
    model = BDH(BDHConfig.from_name("tiny", **changes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def _idx(seed: int = 0, T: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(seed))


def _logits(model: BDH, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


# ---------------------------------------------------------------------------- merge


@pytest.mark.parametrize("copies", [2, 3])
@pytest.mark.parametrize("changes", [{}, {"residual": "neuron"}, {"rope": False}])
def test_a_model_merged_with_itself_computes_the_same_logits(copies, changes):
    model = _model(0, **changes)
    merged = merge.merge_models([model] * copies)
    assert merged.config.N == copies * model.config.N
    idx = _idx()
    torch.testing.assert_close(_logits(merged, idx), _logits(model, idx), rtol=1e-4, atol=1e-4)


def test_merged_neurons_are_the_parents_neurons_in_every_head():
    """With the embedding shared, the merged model's first-layer x (read at the model's own
    activation point) is A's x then B's x in every head: the encoders were split per head."""
    a, b = _model(1), _model(2)
    b.embed.load_state_dict(a.embed.state_dict())
    merged = merge.merge_models([a, b])
    idx = _idx(1)

    def first_x(m: BDH) -> torch.Tensor:
        return m.run_with_cache(idx, names=["layers.0.x"])[1]["x", 0]  # (B, nh, T, N)

    torch.testing.assert_close(first_x(merged), torch.cat([first_x(a), first_x(b)], dim=-1))
    nh, N, D = a.config.n_head, a.config.N, a.config.n_embd
    E = merged.decoder.view(nh, 2 * N, D)
    torch.testing.assert_close(E[:, N:], b.decoder.view(nh, N, D))


def test_frequencies_are_concatenated_not_regenerated():
    a, b = _model(1), _model(2)
    with torch.no_grad():
        b.attn.freqs.mul_(1.5)  # frequencies of its own, as a grown or merged parent has
    merged = merge.merge_models([a, b])
    torch.testing.assert_close(merged.attn.freqs, torch.cat([a.attn.freqs, b.attn.freqs], -1))


def test_shared_tensors_mean_and_task_arithmetic():
    base, a, b = _model(0), _model(1), _model(2)
    mean = merge.merge_models([a, b])
    torch.testing.assert_close(mean.lm_head, (a.lm_head + b.lm_head) / 2)
    ta = merge.merge_models([a, b], base=base, shared="task-arithmetic")
    expected = base.embed.weight + (a.embed.weight - base.embed.weight)
    expected = expected + (b.embed.weight - base.embed.weight)
    torch.testing.assert_close(ta.embed.weight, expected)
    with pytest.raises(merge.MergeError, match="needs --base"):
        merge.merge_models([a, b], shared="task-arithmetic")


def test_heritage_of_a_merge_of_merges_keeps_every_source():
    a, b, c = _model(1), _model(2), _model(3)
    ab = merge.merge_models([a, b], names=["A", "B"])
    abc = merge.merge_models([ab, c], names=["AB", "C"])
    N = a.config.N
    got = [(e["source"], e["ranges"][0]) for e in abc.config.meta["heritage"]]
    assert got == [("A", [0, N]), ("B", [N, 2 * N]), ("C", [2 * N, 3 * N])]


@pytest.mark.parametrize(
    "changes, field", [({"n_embd": 64}, "n_embd"), ({"vocab_size": 128}, "vocab_size"),
                       ({"n_head": 4}, "n_head"), ({"n_layer": 3}, "n_layer")],
)  # fmt: skip
def test_incompatible_parents_are_refused(changes, field):
    with pytest.raises(merge.MergeError, match=field):
        merge.merge_models([_model(0), _model(1, **changes)])


# ---------------------------------------------------------------------------- grow


def test_grow_leaves_logits_unchanged_and_the_new_neurons_train():
    model = _model(0, std=0.02)
    K = model.config.N  # as many again: the new frequencies fall between the old ones
    grown = merge.grow_model(model, K)
    idx = _idx(2)
    torch.testing.assert_close(_logits(grown, idx), _logits(model, idx), rtol=1e-5, atol=1e-5)
    N = model.config.N
    freqs = grown.attn.freqs.flatten()
    torch.testing.assert_close(freqs[:N], model.attn.freqs.flatten())
    assert not set(freqs[N:].tolist()) & set(freqs[:N].tolist())  # frequencies of their own
    grown.train()
    _, loss = grown(idx[:, :-1], idx[:, 1:])
    loss.backward()
    nh, D = model.config.n_head, model.config.n_embd
    new_rows = grown.decoder.grad.view(nh, N + K, D)[:, N:]
    new_cols = grown.encoder.grad[:, :, N:]
    assert new_rows.abs().sum() > 0 and new_cols.abs().sum() > 0  # not silent forever


def test_grow_by_a_width_the_config_cannot_hold_is_refused():
    with pytest.raises(merge.MergeError, match="multiple of 16"):
        merge.grow_model(_model(0), 6)


# ---------------------------------------------------------------------------- prune


def test_prune_by_decoder_norm_undoes_a_silent_grow():
    """Neurons with zero decoder rows and zero D_x columns are exactly the ones pruned away."""
    model = _model(0)
    grown = merge.grow_model(model, model.config.N, scale=0.0)
    pruned = merge.prune_model(grown, keep=0.5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[key], value, rtol=0, atol=0)
    assert [e["ranges"][0] for e in pruned.config.meta["heritage"]] == [[0, 128], [128, 128]]


def test_prune_by_firing_rate_undoes_a_silent_grow():
    """Firing rates read through the model's activation points: silent neurons never fire."""
    model = _model(0)
    N = model.config.N
    grown = merge.grow_model(model, N, scale=0.0)
    tokens = _idx(4, T=96).flatten()
    rates = merge.firing_rate_scores(grown, tokens, block_size=32)
    assert rates.shape == (model.config.n_head, 2 * N)
    assert (rates[:, N:] == 0).all() and rates[:, :N].sum() > 0
    pruned = merge.prune_model(grown, keep=0.5, scores=rates)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[key], value, rtol=0, atol=0)


def test_firing_rate_is_the_share_of_positive_y():
    """Against y recorded by a hook over the whole text at once (one window)."""
    model = _model(0)
    tokens = _idx(5, T=48).flatten()[:48]
    _, cache = model.run_with_cache(tokens[None], names=["layers.0.y", "layers.1.y"])
    expected = sum((cache["y", layer][0] > 0).float().mean(1) for layer in range(2)) / 2
    rates = merge.firing_rate_scores(model, tokens, block_size=48)
    torch.testing.assert_close(rates, expected)


def test_prune_keeps_rotary_pairs_and_their_order():
    model = _model(0)
    scores = torch.zeros(model.config.n_head, model.config.N)
    scores[:, 5] = 10.0  # neuron 5 is the second of pair 2: neuron 4 must come with it
    scores[1, 40] = 9.0
    pruned = merge.prune_model(model, keep=16 / 128, scores=scores)
    kept = pruned.attn.freqs.flatten()
    original = model.attn.freqs.flatten()
    picked = [i for i in range(128) if original[i] in kept.tolist()][:4]
    assert picked[:2] == [4, 5] and kept[0] == kept[1]
    torch.testing.assert_close(pruned.encoder[:, :, :2], model.encoder[:, :, 4:6])
    torch.testing.assert_close(pruned.encoder[:, :, 2:4], model.encoder[:, :, 40:42])


# ---------------------------------------------------------------------------- checkpoints and CLI


def _save(path: Path, model: BDH) -> Path:
    return save_checkpoint(path, model, "bdh", ByteTokenizer())


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    return {
        "a": _save(root / "a", _model(1)),
        "b": _save(root / "b", _model(2)),
        "wide": _save(root / "wide", _model(3, n_embd=64)),
        "ascii": _save(root / "ascii", _model(4, vocab_size=128)),
    }


def test_a_merged_checkpoint_round_trips_with_its_frequencies(parents, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", str(parents["a"]), str(parents["b"]), "--out", str(out)]) == 0
    loaded = load_checkpoint(out)
    a, b = (load_checkpoint(parents[k]).model for k in "ab")
    in_memory = merge.merge_models([a, b])
    torch.testing.assert_close(loaded.model.attn.freqs, torch.cat([a.attn.freqs, b.attn.freqs], -1))
    for key, value in in_memory.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    sources = [e["source"] for e in loaded.config.meta["heritage"]]
    assert sources == [str(parents["a"]), str(parents["b"])]
    idx = _idx(3)
    torch.testing.assert_close(_logits(loaded.model.eval(), idx), _logits(in_memory, idx))


def test_grow_and_prune_from_the_command_line(parents, tmp_path, capsys):
    grown, pruned = tmp_path / "g", tmp_path / "p"
    assert main(["grow", str(parents["a"]), "--add-neurons", "32", "--out", str(grown)]) == 0
    assert load_checkpoint(grown).config.N == 128 + 32
    assert main(["prune", str(grown), "--keep", "0.5", "--out", str(pruned)]) == 0
    assert load_checkpoint(pruned).config.N == 80
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    fired = tmp_path / "f"
    argv = ["prune", str(grown), "--keep", "0.25", "--by", "firing", "--data", str(text)]
    assert main([*argv, "--out", str(fired)]) == 0
    assert load_checkpoint(fired).config.N == 32
    _fails_writing_nothing(capsys, [*argv[:-2], "--out", str(tmp_path / "g2")], tmp_path / "g2",
                           "needs --data")  # fmt: skip


def _fails_writing_nothing(capsys, argv: list[str], out: Path, *expected: str) -> None:
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for text in expected:
        assert text in err[0], err[0]
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before


@pytest.mark.parametrize(
    "other, expected", [("wide", "n_embd differs"), ("ascii", "vocab_size differs")]
)
def test_bad_merges_give_one_line_and_write_nothing(parents, tmp_path, capsys, other, expected):
    out = tmp_path / "m"
    argv = ["merge", str(parents["a"]), str(parents[other]), "--out", str(out)]
    _fails_writing_nothing(capsys, argv, out, expected)


def test_parents_with_different_tokenizers_are_refused(tmp_path, capsys):
    """Same vocabulary size, different BPE merges: the token ids mean different bytes."""
    from bdh.tokenizer import BPETokenizer
    from conftest import synthetic_text

    paths = []
    for seed in (0, 1):
        bpe = BPETokenizer.train([synthetic_text(4_000, seed=seed)[seed * 7 :]], 300)
        model = _model(seed, vocab_size=bpe.vocab_size)
        paths.append(save_checkpoint(tmp_path / f"bpe{seed}", model, "bdh", bpe))
    assert (
        load_checkpoint(paths[0]).config.vocab_size == load_checkpoint(paths[1]).config.vocab_size
    )
    out = tmp_path / "m"
    argv = ["merge", *map(str, paths), "--out", str(out)]
    _fails_writing_nothing(capsys, argv, out, "tokenizers differ")


def test_merging_a_missing_checkpoint(parents, tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["merge", str(parents["a"]), str(tmp_path / "nope"), "--out", str(out)]
    _fails_writing_nothing(capsys, argv, out, "not found", "nope")


def test_the_output_cannot_be_an_input(parents, capsys):
    a = parents["a"]
    before = (a / "model.safetensors").read_bytes()
    argv = ["merge", str(a), str(parents["b"]), "--out", str(a)]
    _fails_writing_nothing(capsys, argv, a, "is also an input")
    assert (a / "model.safetensors").read_bytes() == before
    _fails_writing_nothing(capsys, ["grow", str(a), "--add-neurons", "16", "--out", str(a)], a,
                           "is also an input")  # fmt: skip
    _fails_writing_nothing(capsys, ["prune", str(a), "--keep", "0.5", "--out", str(a)], a,
                           "is also an input")  # fmt: skip


def test_bad_grow_and_prune_values(parents, tmp_path, capsys):
    out = tmp_path / "x"
    _fails_writing_nothing(
        capsys, ["grow", str(parents["a"]), "--add-neurons", "0", "--out", str(out)], out,
        "--add-neurons",
    )  # fmt: skip
    _fails_writing_nothing(
        capsys, ["prune", str(parents["a"]), "--keep", "1.5", "--out", str(out)], out, "--keep"
    )


# ---------------------------------------------------------------------------- the experiment


def test_experiment_quick_reports_every_row_on_every_task(shared_data, tmp_path, capsys):
    """End to end on a tiny model; a second invocation reuses every stage and gives the same
    numbers (the reloaded checkpoints compute what the trained models did)."""
    import json

    argv = ["experiment", "merge", "--quick", "--data", str(shared_data), "--runs", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "merge-quick.json").read_text())
    rows = payload["rows"]
    assert len(rows) == 13 and "control: scratch A+B merged" in rows
    assert rows["merge pruned to half (firing rate)"]["neurons"] == rows["base"]["neurons"]
    for row in rows.values():
        assert set(row["loss"]) == {"english", "translation", "shakespeare"}
        assert all(0 < v < 10 for v in row["loss"].values())
        assert set(row["samples"]) == {"en->fr", "fr->en", "shakespeare", "english"}
    n = rows["base"]["neurons"]
    assert rows["merge A+B (mean)"]["neurons"] == rows["joint (from base)"]["neurons"] * 2 == 2 * n
    assert rows["merge A+B + fine-tune"]["tokens"] <= 0.1 * rows["child A (translation)"]["tokens"]
    assert "| merge A+B (mean) | " in (tmp_path / "merge-quick.md").read_text()
    assert (tmp_path / "merge-quick-samples.md").is_file()
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 8
    again = json.loads((tmp_path / "merge-quick.json").read_text())
    assert {k: r["loss"] for k, r in again["rows"].items()} == {
        k: r["loss"] for k, r in rows.items()
    }
