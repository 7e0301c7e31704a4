"""The model computes SPEC §2 exactly, in every attention form and option."""

from __future__ import annotations

import math

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.reference import reference_forward


def make_model(seed: int = 0, **overrides) -> BDH:
    torch.manual_seed(seed)
    return BDH(BDHConfig.from_name("tiny", **{"damping": None, **overrides})).eval()


def ids(B: int, T: int, V: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_head": 3, "n_layer": 3, "mlp_internal_dim_multiplier": 6},
        {"n_head": 4, "n_layer": 4},
    ],
    ids=["tiny", "3-heads-3-layers", "4-heads-4-layers"],
)
@pytest.mark.parametrize("attention", ["auto", "parallel", "chunked"])
def test_logits_equal_the_literal_reference(overrides, attention):
    """Same weights, B=2, T=300: logits equal SPEC §2 to ≤ 1e-5 relative (fp32)."""
    model = make_model(**overrides, attention=attention)
    idx = ids(2, 300)
    logits, _ = model(idx)
    expected = reference_forward(model.state_dict(), idx, model.config.n_layer)
    assert rel_err(logits, expected) <= 1e-5


def test_naive_and_recurrent_forms_equal_the_reference_too():
    idx = ids(2, 33)
    base = make_model()
    expected = reference_forward(base.state_dict(), idx, base.config.n_layer)
    for form in ("naive", "recurrent"):
        model = make_model(attention=form)
        assert rel_err(model(idx)[0], expected) <= 1e-5


OPTION_SETS = [
    {},
    {"damping": [0.9, 0.99]},
    {"no_bptt": True},
    {"residual": "neuron"},
    {"layernorm": False, "residual": "neuron", "rope": False},
    {"rope": False},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "default")
def test_forms_agree_with_every_option_including_gradients(options):
    """Each form gives the same loss and the same parameter gradients (float64)."""
    idx, targets = ids(2, 23), ids(2, 23, seed=1)
    results = {}
    for form in ("naive", "parallel", "chunked", "recurrent"):
        model = make_model(attention=form, chunk_size=5, **options).double()
        _, loss = model(idx, targets)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[form] = (loss.detach(), grads)
    loss0, grads0 = results["naive"]
    for form, (loss, grads) in results.items():
        torch.testing.assert_close(loss, loss0, rtol=1e-10, atol=1e-10, msg=form)
        for k in grads0:
            torch.testing.assert_close(grads[k], grads0[k], rtol=1e-8, atol=1e-10, msg=k)


def test_no_bptt_changes_gradients_not_outputs():
    idx, targets = ids(2, 19), ids(2, 19, seed=1)
    a, b = make_model().double(), make_model(no_bptt=True).double()
    la, lb = a(idx, targets)[1], b(idx, targets)[1]
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    la.backward()
    lb.backward()
    assert not torch.allclose(a.encoder.grad, b.encoder.grad)


def test_loss_at_initialisation_is_log_vocab():
    model = make_model()
    _, loss = model(ids(4, 64), ids(4, 64, seed=1))
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)


def test_targets_minus_one_are_ignored():
    model = make_model()
    idx, targets = ids(1, 10), ids(1, 10, seed=1)
    masked = targets.clone()
    masked[:, 5:] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, :5], targets[0, :5])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("n_layer", [1, 2, 6])
def test_parameter_count_formula_independent_of_depth(n_layer):
    cfg = BDHConfig.from_name("tiny", damping=None, n_layer=n_layer)
    model = BDH(cfg)
    expected = 3 * cfg.n * cfg.n_embd + 2 * cfg.vocab_size * cfg.n_embd
    assert model.num_params() == expected == cfg.num_params
    assert BDHConfig.from_name("reference").num_params == 25_296_896


def reference_layout_state_dict(cfg: BDHConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """What the reference code's `model.state_dict()` holds, built without our module."""
    g = torch.Generator().manual_seed(3)
    nh, D, N, V = cfg.n_head, cfg.n_embd, cfg.N, cfg.vocab_size
    sd = {
        "decoder": torch.randn(nh * N, D, generator=g) * 0.02,
        "encoder": torch.randn(nh, D, N, generator=g) * 0.02,
        "encoder_v": torch.randn(nh, D, N, generator=g) * 0.02,
        "embed.weight": torch.randn(V, D, generator=g) * 0.02,
        "lm_head": torch.randn(D, V, generator=g) * 0.02,
        "attn.freqs": BDH(cfg).attn.freqs.clone(),
    }
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_reference_state_dict_round_trips(prefix):
    cfg = BDHConfig.from_name("tiny", damping=None)
    ref_sd = reference_layout_state_dict(cfg, prefix)
    model = BDH(cfg).eval()
    model.load_state_dict(ref_sd)
    out = model.state_dict()
    assert set(out) == {k.removeprefix(prefix) for k in ref_sd}
    for k, v in ref_sd.items():
        assert out[k.removeprefix(prefix)].shape == v.shape
        torch.testing.assert_close(out[k.removeprefix(prefix)], v, rtol=0, atol=0)
    idx = ids(2, 40)
    torch.testing.assert_close(model(idx)[0], reference_forward(ref_sd, idx, cfg.n_layer))


def test_rotary_frequencies_are_saved_and_used():
    """A model whose neurons were regrouped keeps each neuron's frequency from its weights."""
    cfg = BDHConfig.from_name("tiny", damping=None)
    sd = reference_layout_state_dict(cfg)
    sd["attn.freqs"] = sd["attn.freqs"].flip(-1).contiguous()
    model = BDH(cfg).eval()
    model.load_state_dict(sd)
    idx = ids(1, 50)
    torch.testing.assert_close(model(idx)[0], reference_forward(sd, idx, cfg.n_layer))
    default = BDH(cfg).eval()
    default.load_state_dict(reference_layout_state_dict(cfg))
    assert not torch.allclose(model(idx)[0], default(idx)[0])


@pytest.mark.parametrize("bad", [256, -1, 1000])
def test_token_id_outside_vocabulary_is_a_clear_error(bad):
    model = make_model()
    idx = ids(1, 8)
    idx[0, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 256\)"):
        model(idx)


def test_dropout_only_in_training_mode():
    model = make_model(dropout=0.5)
    idx = ids(1, 16)
    a, b = model(idx)[0], model(idx)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(idx)[0], a)
