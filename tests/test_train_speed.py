"""The fast training path computes exactly what the literal formulation computes.

Every fast piece (block-causal product, shared complex rotary table, batched chunks, head-summed
decoder, in-place dropout mask, recomputation, autocast) is compared with a literal twin on
outputs and gradients, at lengths that are odd and not multiples of the block or chunk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig, ops
from bdh.ops.common import cheapest_form, keep_mask
from bdh.ops.parallel import causal_decay, causal_product
from bdh.ops.rope import RotaryTable, cos_sin, is_paired, rotate
from bdh.reference import ReferenceBDH, reference_forward
from conftest import synthetic_text


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def literal_product(q, v, decay=None, detach_kv=False):
    """tril(Q Kᵀ, −1) V written out, with K = Q (detached keys and values if asked)."""
    k, vals = (q.detach(), v.detach()) if detach_kv else (q, v)
    scores = (q @ k.mT).tril(-1)
    if decay is not None:
        scores = scores * decay
    return scores @ vals


def grads_of(fn, leaves, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True, materialize_grads=True)
    return out.detach(), grads


# ------------------------------------------------------------------ the block-causal product
@pytest.mark.parametrize("T", [1, 7, 37, 100])
@pytest.mark.parametrize("block", [3, 16, 128])
@pytest.mark.parametrize("option", ["plain", "decay", "detach_kv"])
def test_causal_product_equals_the_masked_product(T, block, option):
    g = torch.Generator().manual_seed(T)
    q = torch.relu(torch.randn(2, 3, T, 6, generator=g, dtype=torch.float64))
    v = torch.randn(2, 1, T, 4, generator=g, dtype=torch.float64)  # one value stream for all heads
    decay = causal_decay(torch.tensor([0.9, 0.5, 1.0], dtype=torch.float64), T)
    decay = decay if option == "decay" else None
    detach = option == "detach_kv"
    out, grads = grads_of(lambda a, b: causal_product(a, b, decay, detach_kv=detach, block=block),
                          [q, v])  # fmt: skip
    out_ref, grads_ref = grads_of(lambda a, b: literal_product(a, b, decay, detach), [q, v])
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_product_broadcasts_extra_batch_dims():
    """Chunks ride along as a batch axis: (B, nh, nc, C, N) with values (B, 1, nc, C, D)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 9, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 1, 4, 9, 3, generator=g, dtype=torch.float64)
    out, grads = grads_of(lambda a, b: causal_product(a, b, block=4), [q, v])
    out_ref, grads_ref = grads_of(literal_product, [q, v])
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_product_rejects_bad_block():
    q = torch.zeros(1, 1, 3, 2)
    with pytest.raises(ValueError, match="block"):
        causal_product(q, q, block=0)


# ------------------------------------------------------------------ rotary table
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_complex_rotation_equals_the_pairwise_formula(dtype):
    N, T, offset = 16, 23, 1000
    freqs = ops.frequencies(N, dtype=dtype) * 3
    x = torch.randn(2, 3, T, N, dtype=dtype)
    table = RotaryTable(freqs, offset, T)
    assert table.phase is not None  # the fast path is taken
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(table.apply(x), rotate(x, *cos_sin(freqs, offset, T)), rtol=tol,
                               atol=tol)  # fmt: skip


def test_rotation_falls_back_for_unpaired_frequencies_and_bf16():
    N, T = 8, 5
    freqs = torch.rand(N, dtype=torch.float64)  # neurons 2j, 2j+1 no longer share a frequency
    assert not is_paired(freqs)
    x = torch.randn(1, 2, T, N, dtype=torch.float64)
    torch.testing.assert_close(RotaryTable(freqs, 3, T).apply(x), rotate(x, *cos_sin(freqs, 3, T)))
    paired = ops.frequencies(N)
    xb = torch.randn(1, 2, T, N).bfloat16()
    assert RotaryTable(paired, 0, T).apply(xb).dtype == torch.bfloat16


def test_rotation_of_a_view_with_odd_storage_offset():
    freqs = ops.frequencies(4, dtype=torch.float64)
    base = torch.randn(1 + 3 * 4, dtype=torch.float64)
    x = base[1:].view(3, 4)  # contiguous, but starts in the middle of a pair
    torch.testing.assert_close(RotaryTable(freqs, 0, 3).apply(x), rotate(x, *cos_sin(freqs, 0, 3)))


# ------------------------------------------------------------------ the model's training path
def literal_twin(model: BDH) -> ReferenceBDH:
    twin = ReferenceBDH(model.config).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


@pytest.mark.parametrize("T", [13, 37, 70])  # parallel below, chunked with a tail above (C = 16)
def test_fast_trunk_equals_the_literal_module_outputs_and_grads(T):
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None, n_layer=3)).double()
    twin = literal_twin(model)
    idx, targets = ids(2, T), ids(2, T, seed=1)
    results = []
    for m in (model, twin):
        logits, loss = m(idx, targets)
        loss.backward()
        results.append(
            (logits.detach(), loss.detach(), {k: p.grad for k, p in m.named_parameters()})
        )
    (la, lossa, ga), (lb, lossb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lossa, lossb, rtol=1e-12, atol=1e-12)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-9, atol=1e-11, msg=k)


def test_both_fast_forms_are_used_and_agree():
    """Long enough for the chunked form, short enough for the masked one: same logits."""
    cfg = BDHConfig.from_name("tiny", damping=None, n_layer=1)
    assert cheapest_form(400, cfg.N, cfg.n_embd, cfg.chunk_size) == "chunked"
    assert cheapest_form(20, cfg.N, cfg.n_embd, cfg.chunk_size) == "parallel"
    torch.manual_seed(0)
    model = BDH(cfg).double().eval()
    idx = ids(1, 400)
    expected = reference_forward(model.state_dict(), idx, cfg.n_layer)
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-10, atol=1e-10)


OPTIONS = [
    {"damping": [0.9, 0.99]},
    {"no_bptt": True},
    {"residual": "neuron"},
    {"layernorm": False, "residual": "neuron", "rope": False},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("T", [19, 45])
def test_fast_trunk_equals_the_naive_form_with_every_option(options, T):
    idx, targets = ids(2, T), ids(2, T, seed=1)
    results = []
    for form in ("auto", "naive"):
        torch.manual_seed(0)
        model = BDH(
            BDHConfig.from_name("tiny", **{"damping": None, "attention": form, **options})
        ).double()
        _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-8, atol=1e-10, msg=k)


def test_recomputation_gives_the_same_loss_and_gradients_with_dropout():
    idx, targets = ids(2, 40), ids(2, 40, seed=1)
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = BDH(BDHConfig.from_name("tiny", damping=None, dropout=0.3)).double().train()
        model.recompute = recompute
        torch.manual_seed(5)  # the same dropout masks in both runs
        _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-12, atol=1e-14, msg=k)


def test_dropout_is_the_literal_dropout_with_the_same_mask(monkeypatch):
    """Masking y in place and rescaling E y afterwards equals nn.Dropout's y·m/(1−p) before E."""
    p = 0.25
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None, dropout=p)).double().train()
    twin = literal_twin(model)
    masks: list[torch.Tensor] = []

    def recorded(shape, prob):
        masks.append(keep_mask(shape, prob))
        return masks[-1]

    class Replay(torch.nn.Module):
        def forward(self, y):
            return y * masks.pop(0) / (1 - p)

    monkeypatch.setattr("bdh.model.keep_mask", recorded)
    idx, targets = ids(2, 21), ids(2, 21, seed=1)
    _, loss = model(idx, targets)
    twin.drop = Replay()
    _, loss_ref = twin(idx, targets)
    assert not masks
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)


def test_keep_mask_rate_and_reproducibility():
    torch.manual_seed(3)
    a = keep_mask((64, 1000), 0.1)
    torch.manual_seed(3)
    b = keep_mask((64, 1000), 0.1)
    assert a.dtype == torch.bool and torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.9) < 0.005


def test_bf16_autocast_trains_and_keeps_the_state_float32():
    """The state stays float32 under autocast; the values are compared on a trained model below
    (at initialisation every path gives the uniform loss)."""
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None))
    idx, targets = ids(2, 40), ids(2, 40, seed=1)
    state = model.init_state(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(idx, targets)
        model.step(idx, state)  # autograd is on: the training trunk with a state
    loss16.backward()
    assert all(S.dtype == torch.float32 for S in state.layers)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _trained_tiny(steps: int = 30) -> tuple[BDH, torch.Tensor, torch.Tensor]:
    """A tiny model trained in float32 on synthetic text, so that its logits are far from 0,
    and a batch it was not trained on."""
    text = np.frombuffer(synthetic_text(30_000).encode(), dtype=np.uint8).astype(np.int64)
    data = torch.from_numpy(text)
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, 20_000, (8, 1), generator=g) + torch.arange(49)
        _, loss = model(data[start[:, :-1]], data[start[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = 25_000 + torch.arange(4)[:, None] * 1000 + torch.arange(97)
    return model, data[held_out[:, :-1]], data[held_out[:, 1:]]


@pytest.mark.usefixtures("one_thread")  # a tiny model: a second thread mostly waits
def test_bf16_autocast_of_a_trained_model_matches_float32():
    """Logits, loss and gradients under bf16 autocast agree with float32, on a model trained far
    enough that the logits carry what it learned (at initialisation they are ~0 and any path
    gives the same loss)."""
    model, idx, targets = _trained_tiny()
    model.zero_grad()
    logits32, loss32 = model(idx, targets)
    loss32.backward()
    grads32 = [p.grad.clone() for p in model.parameters()]
    assert loss32.item() < 0.6 * math.log(256)  # trained: well below the uniform loss

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16 = model(idx, targets)
    loss16.backward()
    error = (logits16.detach().float() - logits32.detach()).abs().max()
    assert float(error) <= 0.05 * float(logits32.detach().abs().max())
    assert abs(loss16.item() - loss32.item()) <= 0.01 * loss32.item()
    for p, g32 in zip(model.parameters(), grads32, strict=True):
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), g32.flatten(), dim=0)
        assert cosine >= 0.99
