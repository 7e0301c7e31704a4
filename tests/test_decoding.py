"""Decoding through the state reproduces the full forward pass, at every position."""

from __future__ import annotations

import itertools

import pytest
import torch

from bdh import BDH, BDHConfig, BDHState
from bdh.generate import generate_naive, sample_next, stream


def make_model(seed: int = 0, **overrides) -> BDH:
    torch.manual_seed(seed)
    model = BDH(BDHConfig.from_name("tiny", **overrides)).eval()
    with torch.no_grad():  # larger output weights: well separated logits, so argmax is stable
        model.lm_head.mul_(50)
    return model


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options",
    [{}, {"damping": 0.97}, {"residual": "neuron"}, {"chunk_size": 7}],
    ids=["default", "damping", "neuron-residual", "chunk-7"],
)
def test_step_by_step_reproduces_full_forward_at_every_position(options):
    model = make_model(**options)
    idx = ids(2, 61)
    full, _ = model(idx)
    state = model.init_state(2)
    with torch.no_grad():
        steps = [model.step(idx[:, t : t + 1], state)[0] for t in range(idx.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state.pos == 61


@pytest.mark.parametrize("cuts", [[1], [17, 18, 40], [5, 30, 31, 59]])
def test_streaming_pieces_of_any_length(cuts):
    model = make_model()
    idx = ids(3, 60)
    full, _ = model(idx)
    state = model.init_state(3)
    bounds = [0, *cuts, 60]
    with torch.no_grad():
        pieces = [model.step(idx[:, a:b], state)[0] for a, b in itertools.pairwise(bounds)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_state_size_is_constant_in_the_context():
    model = make_model()
    state = model.init_state(1)
    size = state.nbytes
    c = model.config
    assert size == c.n_layer * c.n_head * c.N * c.n_embd * 4
    with torch.no_grad():
        model.step(ids(1, 100), state)
        model.step(ids(1, 1), state)
    assert state.nbytes == size and state.pos == 101


def test_greedy_200_tokens_equal_full_recomputation():
    """Greedy decoding through the state = greedy by full re-computation."""
    model = make_model()
    prompt = ids(2, 9)
    ours = model.generate(prompt, 200, top_k=1)
    theirs = generate_naive(model, prompt, 200, top_k=1)
    assert ours.shape == (2, 209)
    assert torch.equal(ours, theirs)


def test_sampling_with_a_seed_matches_full_recomputation():
    model = make_model()
    prompt = ids(1, 5)
    kwargs = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
    ours = model.generate(prompt, 40, generator=torch.Generator().manual_seed(7), **kwargs)
    theirs = generate_naive(model, prompt, 40, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(ours, theirs)


def test_stream_yields_tokens_one_by_one_and_callback_sees_them():
    model = make_model()
    prompt = ids(1, 4)
    seen = []
    out = model.generate(prompt, 6, top_k=1, callback=seen.append)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 4:])
    assert [t.shape for t in stream(model, prompt, 3, top_k=1)] == [(1, 1)] * 3
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample_next(logits, top_p=0.5, generator=g).item() for _ in range(50)}
    assert picks == {0}  # token 0 alone holds > 50% of the mass
    assert sample_next(logits, top_k=1).item() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"top_k": 0}, "top_k must be an integer ≥ 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_settings_are_clear_errors(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.generate(ids(1, 3), 2, **kwargs)


def test_state_batch_mismatch_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="batch size 2 but the state holds 1"):
        model.step(ids(2, 3), model.init_state(1))


def test_state_clone_branches_and_save_load_round_trip(tmp_path):
    model = make_model()
    state = model.init_state(1)
    with torch.no_grad():
        model.step(ids(1, 20), state)
        branch = state.clone()
        a, _ = model.step(ids(1, 1, seed=5), state)
        b, _ = model.step(ids(1, 1, seed=5), branch)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    state.save(tmp_path / "s.safetensors")
    loaded = BDHState.load(tmp_path / "s.safetensors")
    assert loaded.pos == state.pos == 21
    for x, y in zip(loaded.layers, state.layers, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
