"""Named activation points: what the cache records is what the model computes, hooks steer it the
same way in `forward`, training and `model.step`, and nothing stays set after a call."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bdh.interpret as interpret
from bdh import BDH, BDHConfig
from bdh.decode import DecodeOptions

LAYER, HEAD = 1, 1  # where a neuron is ablated (a tiny model has 2 layers, 2 heads)


def trained_model(seed: int = 0, steps: int = 12, **overrides) -> BDH:
    """A tiny model trained a few steps on a repeating byte pattern: sparse, non-random weights."""
    torch.manual_seed(seed)
    model = BDH(BDHConfig.from_name("tiny", **{"damping": None, **overrides}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.tensor(list(b"the king and the lord of the night " * 8))
    for _ in range(steps):
        start = torch.randint(0, len(text) - 33, (4,))
        batch = torch.stack([text[s : s + 33] for s in start.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> BDH:
    return trained_model()


@pytest.fixture(scope="module")
def neuron(model) -> int:
    """The neuron of head HEAD whose y fires most in layer LAYER: ablating it matters."""
    _, cache = model.run_with_cache(ids(2, 24), names=[f"layers.{LAYER}.y"])
    return int((cache["y", LAYER][:, HEAD] > 0).sum((0, 1)).argmax())


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def zero(neuron: int):
    """A hook that sets one neuron of head HEAD to zero at every position."""

    def hook(t: torch.Tensor, name: str) -> torch.Tensor:
        out = t.clone()
        out[:, HEAD, :, neuron] = 0
        return out

    return hook


def changes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) > 1e-3 * float(b.abs().max())


# ---------------------------------------------------------------------- a hand-written forward
def _ln(t: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(t, (t.shape[-1],), eps=1e-5)


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    phases = torch.arange(x.shape[-2], dtype=freqs.dtype).view(1, 1, -1, 1) * freqs
    phases = (phases % 1) * (2 * math.pi)
    swapped = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).view(*x.size())
    return x * torch.cos(phases) + swapped * torch.sin(phases)


def hand_forward(model: BDH, idx: torch.Tensor, ablate: tuple[int, int, int] | None = None):
    """SPEC §2 as in `bdh.reference` (full masked T×T product, heads concatenated), with the
    neuron (layer, head, i) of x set to zero in that layer only."""
    sd = {k: t.detach() for k, t in model.state_dict().items()}
    enc, enc_v, dec = sd["encoder"], sd["encoder_v"], sd["decoder"]
    nh, D, N = enc.shape
    B, T = idx.shape
    v = _ln(F.embedding(idx, sd["embed.weight"]).unsqueeze(1))  # (B, 1, T, D)
    for layer in range(model.config.n_layer):
        x = F.relu(v @ enc)  # (B, nh, T, N)
        if ablate is not None and ablate[0] == layer:
            x = x.clone()
            x[:, ablate[1], :, ablate[2]] = 0
        q = _rope(x, sd["attn.freqs"])
        a = _ln((q @ q.mT).tril(diagonal=-1) @ v)  # (B, nh, T, D)
        y = x * F.relu(a @ enc_v)
        u = _ln(y.transpose(1, 2).reshape(B, 1, T, N * nh) @ dec)
        v = _ln(v + u)
    return v.view(B, T, D) @ sd["lm_head"]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


# ---------------------------------------------------------------------- forward
def test_cache_holds_what_the_model_computes(model):
    idx = ids(2, 24)
    logits, cache = model.run_with_cache(idx)
    assert torch.equal(logits, model(idx)[0])
    enc = model.encoder.detach()
    for layer in range(model.config.n_layer):
        x, v = cache["x", layer], cache[f"layers.{layer}.v"]
        assert x.shape == (2, 2, 24, model.config.N) and v.shape == (2, 24, 32)
        assert torch.equal(x, torch.relu(v.unsqueeze(1) @ enc))
        y = x * torch.relu(_ln(cache["a", layer]) @ model.encoder_v.detach())
        assert torch.equal(cache["y", layer], y)
    assert torch.equal(cache["logits"], logits.detach())
    assert torch.equal(cache["v", 0], _ln(model.embed(idx)).detach())
    assert 0 < float((cache["x", 0] > 0).float().mean()) < 1  # trained: sparse, not dead
    assert list(cache) == interpret.hook_names(model)


def test_the_hand_written_forward_is_the_model(model):
    idx = ids(2, 24)
    close(hand_forward(model, idx), model(idx)[0].detach())


def test_identity_hooks_leave_logits_bit_identical(model):
    idx = ids(2, 24)
    everywhere = [(name, lambda t, name: t) for name in interpret.hook_names(model)]
    assert torch.equal(model.run_with_hooks(idx, hooks=everywhere), model(idx)[0])


def test_zeroing_one_neuron_equals_the_hand_written_ablation(model, neuron):
    idx = ids(2, 24)
    ablated = model.run_with_hooks(idx, hooks=[(f"layers.{LAYER}.x", zero(neuron))]).detach()
    expected = hand_forward(model, idx, ablate=(LAYER, HEAD, neuron))
    close(ablated, expected)
    # The neuron fires there, so the ablation changes the logits; and only from the layer it is in.
    assert changes(ablated, model(idx)[0].detach())
    assert changes(expected, hand_forward(model, idx, ablate=(0, HEAD, neuron)))


def test_names_select_what_is_kept_and_to_dtype_convert(model):
    idx = ids(1, 8)
    _, cache = model.run_with_cache(idx, names=["layers.1.y", "logits"])
    assert list(cache) == ["layers.1.y", "logits"]
    _, cache = model.run_with_cache(idx, names=lambda n: n.endswith(".x"), dtype=torch.float64)
    assert list(cache) == ["layers.0.x", "layers.1.x"] and cache["x", 1].dtype == torch.float64
    assert ("x", 1) in cache and "layers.0.y" not in cache
    with pytest.raises(KeyError, match="was not recorded"):
        cache["y", 0]


@pytest.mark.parametrize(
    "name", ["layers.2.x", "layers.0.z", "blocks.0.x", "x", "layers.-1.x", "layers.01x"]
)
def test_unknown_names_are_a_one_line_error(model, name):
    with pytest.raises(ValueError, match="unknown activation point"):
        model.run_with_cache(ids(1, 4), names=[name])
    assert model._hooks == {}


def test_a_replacement_of_the_wrong_shape_is_an_error(model):
    with pytest.raises(ValueError, match=r"hook on layers.0.a returned \(4, 4\)"):
        model.run_with_hooks(ids(1, 4), hooks=[("layers.0.a", lambda t, n: t[0, 0, :, :4])])
    assert model._hooks == {}


def test_hooks_are_removed_after_every_call_even_on_error(model):
    idx = ids(1, 6)

    def boom(t, name):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(idx, hooks=[("layers.1.v", boom)])
    assert model._hooks == {}
    with pytest.raises(RuntimeError, match="inside"), interpret.hooks(model, [("logits", boom)]):
        raise RuntimeError("inside")
    assert model._hooks == {}
    failing = pytest.raises(RuntimeError, match="hook failed")
    with failing, interpret.capture(model), torch.no_grad():
        model.step(idx[:, :1], model.init_state(1))
        with interpret.hooks(model, [("logits", boom)]):
            model.step(idx[:, 1:2], model.init_state(1))
    assert model._hooks == {}
    assert torch.equal(model(idx)[0], model.run_with_cache(idx)[0])


def test_nested_hooks_run_in_order_and_outer_ones_stay(model):
    seen = []
    with interpret.hooks(model, [("logits", lambda t, n: seen.append("outer"))]):
        with interpret.hooks(model, [("logits", lambda t, n: seen.append("inner"))]):
            model(ids(1, 3))
        model(ids(1, 3))
    assert seen == ["outer", "inner", "outer"] and model._hooks == {}


def test_hooks_fire_the_same_in_training(model, neuron):
    """With autograd (and activation recomputation, which hooks turn off) the points agree."""
    idx = ids(2, 16)
    _, eval_cache = model.run_with_cache(idx)
    model.train()
    model.recompute = True
    try:
        with interpret.capture(model) as cache:
            _, loss = model(idx, idx)
            loss.backward()
        ablated = model.run_with_hooks(idx, hooks=[(f"layers.{LAYER}.x", zero(neuron))])
    finally:
        model.eval()
        model.recompute = False
        model.zero_grad()
    for name in interpret.hook_names(model):
        assert torch.equal(cache[name], eval_cache[name]), name
    close(ablated.detach(), hand_forward(model, idx, ablate=(LAYER, HEAD, neuron)))


def test_the_cache_keeps_y_before_dropout(model):
    """Dropout masks y in place after the point: what was recorded must not change with it."""
    idx = ids(2, 16)
    _, eval_cache = model.run_with_cache(idx, names=["layers.0.y"])
    model.train()
    model.drop.p = 0.5
    try:
        _, cache = model.run_with_cache(idx, names=["layers.0.y", "layers.1.v"])
    finally:
        model.eval()
        model.drop.p = 0.0
    assert torch.equal(cache["y", 0], eval_cache["y", 0])  # layer 0's y comes before any mask
    _, eval_v = model.run_with_cache(idx, names=["layers.1.v"])
    assert not torch.equal(cache["v", 1], eval_v["v", 1])  # and the mask was applied after it


# ---------------------------------------------------------------------- through model.step
STEP_OPTIONS = {
    "state-dense": DecodeOptions(kv="off", attention="dense", y_path="dense"),
    "state-sparse": DecodeOptions(kv="off", attention="sparse", y_path="sparse"),
    "kv-cache": DecodeOptions(kv="on", attention="sparse", y_path="sparse"),
}


def step_by_step(model: BDH, idx: torch.Tensor, options: DecodeOptions, prefill: int = 0):
    """Feed idx: `prefill` tokens at once, then one by one; logits (B, T, V)."""
    engine = model.decoding_engine(options)
    state = engine.init_state(idx.shape[0])
    with torch.no_grad():
        pieces = [engine.step(idx[:, :prefill], state)] if prefill else []
        pieces += [engine.step(idx[:, t : t + 1], state) for t in range(prefill, idx.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("options", STEP_OPTIONS.values(), ids=STEP_OPTIONS.keys())
def test_step_records_the_activations_of_the_full_forward(model, options):
    idx = ids(2, 20)
    logits, full = model.run_with_cache(idx)
    with interpret.capture(model) as cache:
        stepped = step_by_step(model, idx, options, prefill=7)
    close(stepped, logits.detach())
    for name in interpret.hook_names(model):
        assert cache[name].shape == full[name].shape, name
        close(cache[name], full[name])


@pytest.mark.parametrize("options", STEP_OPTIONS.values(), ids=STEP_OPTIONS.keys())
@pytest.mark.parametrize("point", ["x", "y"])
def test_an_ablation_through_step_equals_it_through_forward(model, neuron, options, point):
    idx = ids(2, 20)
    hook = [(f"layers.{LAYER}.{point}", zero(neuron))]
    forward = model.run_with_hooks(idx, hooks=hook).detach()
    with interpret.hooks(model, hook):
        stepped = step_by_step(model, idx, options, prefill=5)
    close(stepped, forward)
    assert changes(forward, model(idx)[0].detach())  # the ablation does something


def test_step_with_autograd_fires_the_same_points(model):
    """Training through the state (`model.step` with autograd) takes the training pass."""
    idx = ids(1, 12)
    _, full = model.run_with_cache(idx)
    state = model.init_state(1)
    with interpret.capture(model, ["layers.1.x", "logits"]) as cache:
        pieces = [model.step(idx[:, t : t + 4], state)[0] for t in range(0, 12, 4)]
    assert all(p.requires_grad for p in pieces)
    close(cache["x", 1], full["x", 1])
    close(cache["logits"], full["logits"])


def test_model_step_and_generate_fire_inside_the_context(model):
    prompt = ids(1, 5)
    with interpret.capture(model, ["layers.0.x", "logits"]) as cache:
        out = model.generate(prompt, 6, top_k=1)
    T = out.shape[1] - 1  # the last sampled token is never fed back
    assert cache["x", 0].shape[2] == T and cache["logits"].shape[1] == T
    _, full = model.run_with_cache(out[:, :T])
    close(cache["x", 0], full["x", 0])
    with interpret.capture(model, ["layers.1.a"]) as cache, torch.no_grad():
        state = model.init_state(1)
        for t in range(T):
            model.step(out[:, t : t + 1], state)
    close(cache["a", 1], full["a", 1])


def test_pieces_of_different_batch_shapes_are_a_clear_error(model):
    from bdh.generate import generate_batch

    with interpret.capture(model, ["layers.0.x"]) as cache:
        generate_batch(model, [b"To be", b"Now is the"], 2, top_k=1)
    with pytest.raises(ValueError, match="different batch shapes"):
        cache["x", 0]


def test_neuron_residual_points_accumulate_x():
    """With residual="neuron", layers.l.x = layers.(l−1).x + relu(layers.l.v D_x)."""
    model = trained_model(steps=5, residual="neuron")
    idx = ids(2, 12)
    _, cache = model.run_with_cache(idx)
    enc = model.encoder.detach()
    assert torch.equal(cache["x", 0], torch.relu(cache["v", 0].unsqueeze(1) @ enc))
    x1 = cache["x", 0] + torch.relu(cache["v", 1].unsqueeze(1) @ enc)
    assert torch.equal(cache["x", 1], x1)
    with interpret.capture(model) as stepped:
        step_by_step(model, idx, STEP_OPTIONS["state-sparse"])
    for name in interpret.hook_names(model):
        close(stepped[name], cache[name])


# ---------------------------------------------------------------------- a trained checkpoint
@pytest.mark.slow
def test_must_show_on_a_trained_checkpoint():
    """On `runs/quickstart` (or $BDH_CHECKPOINT): `pytest -m slow -k trained_checkpoint`."""
    import os

    from bdh.checkpoint import load_checkpoint
    from conftest import REPO

    path = os.environ.get("BDH_CHECKPOINT", str(REPO / "runs" / "quickstart"))
    if not os.path.exists(path):
        pytest.skip(f"no trained checkpoint at {path} (set BDH_CHECKPOINT)")
    model = load_checkpoint(path).model.eval()
    c = model.config
    if c.residual != "reference" or not (c.layernorm and c.rope) or c.damping is not None:
        pytest.skip("the hand-written forward is the reference architecture")
    idx = ids(2, 64)
    with torch.no_grad():
        logits, cache = model.run_with_cache(idx)
        assert torch.equal(logits, model(idx)[0])
        assert torch.equal(cache["x", 0], torch.relu(cache["v", 0].unsqueeze(1) @ model.encoder))
        everywhere = [(name, lambda t, name: t) for name in interpret.hook_names(model)]
        assert torch.equal(model.run_with_hooks(idx, hooks=everywhere), logits)
        layer = c.n_layer - 1
        _, y = model.run_with_cache(idx, names=[f"layers.{layer}.y"])
        neuron = int((y["y", layer][:, HEAD] > 0).sum((0, 1)).argmax())
        hook = [(f"layers.{layer}.x", zero(neuron))]
        ablated = model.run_with_hooks(idx, hooks=hook)
        close(ablated, hand_forward(model, idx, ablate=(layer, HEAD, neuron)), tol=1e-4)
        assert changes(ablated, logits)
        with interpret.capture(model) as stepped:
            step_by_step(model, idx, DecodeOptions(), prefill=16)
        for name in interpret.hook_names(model):
            close(stepped[name], cache[name], tol=1e-4)
        with interpret.hooks(model, hook):
            close(step_by_step(model, idx, DecodeOptions(), prefill=16), ablated, tol=1e-4)
