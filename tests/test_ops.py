"""Every attention form equals the naive token loop: outputs, final state and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdh import ops
from bdh.ops import FORMS, chunked, naive, parallel, recurrent

B, NH, N, D = 2, 3, 8, 5


def make_inputs(T: int, dtype=torch.float64, seed: int = 0, with_state: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(B, NH, T, N, generator=g, dtype=dtype))  # sparse, positive
    v = torch.randn(B, 1, T, D, generator=g, dtype=dtype)
    state = torch.randn(B, NH, N, D, generator=g, dtype=dtype) if with_state else None
    freqs = ops.frequencies(N, dtype=dtype) * 7  # faster turns so rotation matters at small T
    return x, v, state, freqs


FORM_KWARGS = [
    ("parallel", {}),
    ("chunked", {"chunk_size": 1}),
    ("chunked", {"chunk_size": 4}),  # does not divide the odd T used below
    ("chunked", {"chunk_size": 64}),  # larger than T: one chunk
    ("recurrent", {}),
]
OPTIONS = [
    {},
    {"damping": torch.tensor([0.9, 1.0, 0.5], dtype=torch.float64)},
    {"no_rope": True},
    {"detach_kv": True},
]


def run(form, kwargs, x, v, freqs, state, offset=0, **options):
    if options.pop("no_rope", False):
        freqs = None
    return FORMS[form](x, v, freqs, state, offset, **options, **kwargs)


@pytest.mark.parametrize(("form", "kwargs"), FORM_KWARGS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "damping", "no-rope", "no-bptt"])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_equal_naive_outputs_state_and_grads(form, kwargs, options, with_state):
    T, offset = 13, 5
    x, v, state, freqs = make_inputs(T, with_state=with_state)
    inputs = [x, v] + ([state] if with_state else [])

    def outputs(fn_form, fn_kwargs):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        s0 = leaves[2] if with_state else None
        out, s = run(fn_form, fn_kwargs, leaves[0], leaves[1], freqs, s0, offset, **dict(options))
        # A fixed random projection makes every output and state entry matter to the gradient.
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return out.detach(), s.detach(), grads

    out_ref, s_ref, g_ref = outputs("naive", {})
    out, s, grads = outputs(form, kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("form", "kwargs"), FORM_KWARGS)
def test_forms_equal_naive_float32(form, kwargs):
    x, v, state, freqs = make_inputs(37, dtype=torch.float32, with_state=True)
    out_ref, s_ref = naive(x, v, freqs, state, 11)
    out, s = run(form, kwargs, x, v, freqs, state, 11)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_identity_float64_to_1e12():
    """The masked product and the recurrence are one function: agree to ~1e-12 in float64."""
    x, v, _, freqs = make_inputs(41, dtype=torch.float64)
    out_ref, s_ref = naive(x, v, freqs)
    for form, kwargs in FORM_KWARGS:
        out, s = run(form, kwargs, x, v, freqs, None)
        assert (out - out_ref).abs().max() <= 1e-12 * max(1.0, out_ref.abs().max())
        assert (s - s_ref).abs().max() <= 1e-12 * max(1.0, s_ref.abs().max())


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 28), min_size=0, max_size=4, unique=True),
    forms=st.lists(
        st.sampled_from(["parallel", "chunked", "recurrent", "naive"]), min_size=5, max_size=5
    ),
    chunk=st.integers(1, 9),
    damped=st.booleans(),
)
def test_split_and_resume_through_the_state(cuts, forms, chunk, damped):
    """Cutting a sequence anywhere and resuming from the state gives the uncut result."""
    T = 29
    x, v, _, freqs = make_inputs(T)
    damping = torch.tensor([0.8, 0.95, 1.0], dtype=torch.float64) if damped else None
    out_ref, s_ref = naive(x, v, freqs, None, 0, damping)
    bounds = [0, *sorted(cuts), T]
    pieces, state = [], None
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        kwargs = {"chunk_size": chunk} if forms[i] == "chunked" else {}
        out, state = FORMS[forms[i]](x[:, :, a:b], v[:, :, a:b], freqs, state, a, damping, **kwargs)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=2), out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, s_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["naive", "parallel", "chunked", "recurrent"])
def test_a_token_never_attends_to_itself(form):
    x, v, _, freqs = make_inputs(9)
    out, _ = FORMS[form](x, v, freqs)
    assert torch.all(out[:, :, 0] == 0)  # the first token sees nothing
    t = 4
    v2 = v.clone()
    v2[:, :, t] += 10.0  # changing token t's value changes only the tokens after it
    out2, _ = FORMS[form](x, v2, freqs)
    torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=0)
    assert (out2[:, :, t + 1 :] - out[:, :, t + 1 :]).abs().max() > 1e-3


def test_parallel_without_state_skips_it():
    x, v, _, freqs = make_inputs(7)
    out, s = parallel(x, v, freqs, need_state=False)
    assert s is None
    torch.testing.assert_close(out, naive(x, v, freqs)[0], rtol=1e-10, atol=1e-10)


def test_state_is_float32_for_low_precision_inputs():
    x, v, _, freqs = make_inputs(6, dtype=torch.float32)
    for form in ("naive", "parallel", "chunked", "recurrent"):
        _, s = FORMS[form](x.bfloat16(), v.bfloat16(), freqs)
        assert s.dtype == torch.float32


def test_recurrent_in_place_matches_functional():
    x, v, state, freqs = make_inputs(5, dtype=torch.float32, with_state=True)
    damping = torch.tensor([0.9, 0.7, 1.0])
    out_ref, s_ref = recurrent(x, v, freqs, state.clone(), 3, damping)
    s_in = state.clone()
    with torch.no_grad():
        out, s = recurrent(x, v, freqs, s_in, 3, damping, inplace=True)
    assert s.data_ptr() == s_in.data_ptr()
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-6)


def test_chunked_rejects_bad_chunk_size():
    x, v, _, freqs = make_inputs(4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked(x, v, freqs, chunk_size=0)


def test_frequencies_follow_the_spec():
    n = 16
    f = ops.frequencies(n, dtype=torch.float64)
    for i in range(n):
        expected = (2.0**16) ** (-2 * (i // 2) / n) / (2 * math.pi)
        assert f[i].item() == pytest.approx(expected, rel=1e-12)


def test_rope_is_a_rotation_with_relative_scores():
    """⟨rope_t a, rope_τ b⟩ depends only on t − τ (the paper's U^{t−τ}) and norms are kept."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 1, N, generator=g, dtype=torch.float64)
    freqs = ops.frequencies(N, dtype=torch.float64)
    ra = ops.rope(a, freqs, 10)
    torch.testing.assert_close(ra.norm(), a.norm())
    s1 = (ops.rope(a, freqs, 10) * ops.rope(b, freqs, 3)).sum()
    s2 = (ops.rope(a, freqs, 27) * ops.rope(b, freqs, 20)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-9, atol=1e-9)
