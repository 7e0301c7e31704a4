"""Spiking BDH (stochastic AND of Bernoulli spikes) converges to the deterministic BDH.

Each spiking rule is unbiased (its expectation is the deterministic rule) and its error falls like
1/√runs; so does the error of the whole model's logits, since every round averages `runs` trials.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.graph import from_tensor
from bdh.graph.engine import VectorOps
from bdh.graph.spiking import SpikingOps, measure_convergence, slope


def tiny_bdh(std: float = 0.3, seed: int = 0) -> object:
    config = BDHConfig(
        n_layer=2, n_embd=8, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0,
        vocab_size=12, residual="neuron", layernorm=False, rope=False, damping=[0.875, 0.5],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BDH(config).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return from_tensor(model)


TOKENS = [3, 7, 1, 4, 9]


def warmed_simulator():
    """A simulator mid-sequence (σ non-zero), stopped before layer 2's rounds."""
    sim = tiny_bdh().simulator()
    for t in TOKENS[:-1]:
        sim.step(t)
    sim.step(TOKENS[-1])  # leaves X = x_{t,L}, Y = y_{t,L}, σ written
    return sim


def apply_rule(sim, ops, name: str, layer: int = 1):
    sim = copy.copy(sim)
    sim.state = copy.deepcopy(sim.state)
    sim.sigma = copy.deepcopy(sim.sigma)
    sim.ops = ops
    ops.apply(name, sim, layer)
    return np.concatenate(
        [sim.state.A.ravel(), sim.state.Xe, sim.state.Y, sim.sigma_dense().ravel()]
    )


@pytest.mark.parametrize("rule", ["infer", "hebb", "x_excite", "fire_y"])
def test_each_spiking_rule_is_unbiased_with_error_falling_as_one_over_sqrt_runs(rule):
    sim = warmed_simulator()
    if rule == "fire_y":  # give the dendrites input first
        sim.state.Ye[:] = np.abs(np.random.default_rng(0).normal(size=sim.state.Ye.shape))
    exact = apply_rule(sim, VectorOps(), rule)
    errors = {}
    for runs in (16, 64, 256, 1024):
        samples = np.stack(
            [apply_rule(sim, SpikingOps(runs, 100 * runs + k), rule) for k in range(40)]
        )
        errors[runs] = float(np.sqrt(((samples - exact) ** 2).mean()))
    assert errors[1024] > 0.0  # the rule was really stochastic
    assert -0.6 < slope(errors) < -0.4, errors
    # Unbiased: averaging 40 estimates shrinks the RMS error by √40 (a bias would not shrink).
    bias = float(np.sqrt(((samples.mean(0) - exact) ** 2).mean()))
    assert bias < 2.0 * errors[1024] / np.sqrt(len(samples))


def test_whole_model_spiking_average_converges_to_the_deterministic_logits():
    graph = tiny_bdh(std=0.2)
    tokens = [3, 7, 1, 4, 9, 2]
    errors = measure_convergence(graph, tokens, runs=[256, 1024, 4096, 16384], repeats=6)
    # Measured slopes over independent seeds: −0.44 … −0.57 (docs/graph-model.md).
    assert -0.65 < slope(errors) < -0.4, errors
    assert errors[16384] < 0.05  # RMS error relative to the RMS logit


def test_spiking_rejects_bad_runs():
    with pytest.raises(ValueError, match="runs"):
        SpikingOps(0)
