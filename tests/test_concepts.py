"""Concept synapses: the search finds a planted synapse, its blockwise σ equals the full σ, the
statistics equal scipy's, the sentence split is disjoint, and `bdh experiment synapses --quick`
runs end to end."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from bdh import BDH, BDHConfig
from bdh.cli import main
from bdh.experiments import synapses as exp
from bdh.interpret import concepts
from bdh.interpret.hooks import ActivationCache
from bdh.interpret.synapses import synapses

CONCEPT_TOKEN = 200


class PlantedBDH(BDH):
    """A tiny BDH whose recorded activations are seeded noise, except one planted synapse:
    y_{L−1}(I) and x_L(J) of head H fire together at the concept token, and fire apart (never
    at the same token) in every other sentence, so only σ(I, J) separates the two sets."""

    LAYER, HEAD, I, J = 1, 1, 37, 11

    def run_with_cache(self, idx, names=None, to=None, dtype=None):
        cfg, cache = self.config, ActivationCache()
        B, T = idx.shape
        for name in names:
            layer, kind = int(name.split(".")[1]), name.split(".")[2]
            seed = zlib.crc32(bytes(idx.flatten().tolist()) + name.encode())
            g = torch.Generator().manual_seed(seed)
            noise = torch.rand(B, cfg.n_head, T, cfg.N, generator=g, dtype=torch.float64)
            act = torch.relu(noise - 0.7)  # sparse and positive, as after the ReLU
            head, k = self.plant(kind, layer)
            if head is not None:
                for b in range(B):
                    act[b, head, :, k] = 0.0
                    hits = (idx[b] == CONCEPT_TOKEN).nonzero().flatten().tolist()
                    apart = [1] if kind == "y" else [3]  # contrast: both fire, never together
                    act[b, head, hits or apart, k] = 2.0
            cache.add(name, act.to(dtype or torch.float32))
        return None, cache

    def plant(self, kind, layer):
        N = self.config.N
        if kind == "y" and layer == self.LAYER - 1:
            return self.I // N, self.I % N
        if kind == "x" and layer == self.LAYER:
            return self.HEAD, self.J
        return None, None


def _sentences(count, concept, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        s = torch.randint(0, 128, (int(torch.randint(8, 14, (1,), generator=g)),), generator=g)
        if concept:
            s[int(torch.randint(4, len(s), (1,), generator=g))] = CONCEPT_TOKEN
        out.append(s)
    return out


def test_the_search_finds_the_planted_synapse_and_it_holds_out():
    config = BDHConfig.from_name("tiny", damping=None, n_layer=3, rope=False)
    model = PlantedBDH(config)
    found = concepts.find_concept_synapses(
        model, _sentences(14, True, 0), _sentences(14, False, 1), top_k=5, candidates=6,
        block_rows=24,  # blocks that do not divide n: the offsets of every block count
    )  # fmt: skip
    best = found.best
    planted = (PlantedBDH.LAYER, PlantedBDH.HEAD, PlantedBDH.I, PlantedBDH.J)
    assert (best.layer, best.head, best.i, best.j) == planted
    assert best.auc == 1.0 and found.top[1].auc < 1.0  # nothing else separates perfectly
    assert found.searched == 2 * config.n_head * config.n * config.N
    test = concepts.test_synapse(model, best, _sentences(10, True, 2), _sentences(9, False, 3))
    assert test.u == test.u_opt == 90 and test.r == 1.0 and test.p < 1e-3


def test_blockwise_end_values_equal_the_full_sigma_with_rope():
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=None, n_layer=3)).double().eval()
    idx = torch.randint(0, 256, (15,))
    layer, head = 2, 1
    full = synapses(model, idx, layer, head)[0, 0]  # (n, N) after the last token
    reading = concepts._read(model, idx, [1, 2], torch.float64)
    freqs, lam = concepts._rope_damping(model, head)
    rows = slice(10, 29)
    block = concepts._end_block(reading, layer, head, rows, freqs, lam)
    np.testing.assert_allclose(block.numpy(), full[rows].numpy(), rtol=1e-10, atol=1e-12)
    pairs = [(3, 5), (40, 0), (63, 31)]
    values = concepts.synapse_values(model, [idx], layer, head, pairs)
    want = torch.stack([full[i, j] for i, j in pairs]).numpy()
    np.testing.assert_allclose(values["end"][0], want, rtol=1e-10, atol=1e-12)
    traj = synapses(model, idx, layer, head, pairs=pairs)[0]
    steps = torch.diff(traj, dim=0, prepend=torch.zeros(1, 3, dtype=traj.dtype))
    np.testing.assert_allclose(values["jump"][0], steps.max(0).values.numpy())


def test_statistics_equal_scipy_mannwhitneyu_with_ties():
    rng = np.random.default_rng(0)
    pos = np.round(rng.exponential(size=(23, 40)), 1)
    neg = np.round(rng.exponential(size=(17, 40)), 1) * 0.8
    pos[:, 0], neg[:, 0] = 0.0, 0.0  # a silent synapse: all ties
    u = concepts.u_statistics(pos, neg)
    for c in range(40):
        want = stats.mannwhitneyu(pos[:, c], neg[:, c], alternative="greater")
        assert u[c] == pytest.approx(want.statistic, abs=1e-9)
    test = concepts.separation(pos[:, 5], neg[:, 5])
    want = stats.mannwhitneyu(pos[:, 5], neg[:, 5], alternative="greater")
    assert test.u == pytest.approx(want.statistic) and test.p == pytest.approx(want.pvalue)
    assert test.u_opt == 23 * 17
    # rank-biserial r = P(concept > contrast) − P(concept < contrast), counted pair by pair
    diff = pos[:, 5, None] - neg[None, :, 5]
    assert test.r == pytest.approx((diff > 0).mean() - (diff < 0).mean())


def _tricky_pairs(path):
    """Pairs where sentences recur: an English sentence with two translations, a French sentence
    shared by two English ones, and a contrast sentence that translates a concept sentence."""
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(60):
        pairs += [(f"I have {k} euros.", f"J'ai {k} euros."), (f"I have {k} euros.", f"{k} euros.")]
        pairs += [(f"Take {k} dollars.", f"{k} euros."), (f"He went to Japan {k}.", f"Japon {k}.")]
        pairs += [(f"It rains {k} times.", f"Il pleut {k} fois.")]
        pairs += [(f"Rain {k}!" + "!" * int(rng.integers(0, 9)), f"J'ai {k} euros.")]
        pairs += [(f"Cats {k} sleep" + "." * int(rng.integers(0, 9)), f"Chats {k}.")]
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    return pairs


def test_discovery_and_test_share_no_sentence_nor_translation(tmp_path):
    pairs = _tricky_pairs(tmp_path / "pairs.tsv")
    cfg = exp.SynapsesConfig(pairs=str(tmp_path / "pairs.tsv"), discovery=20, test=10)
    by_en, by_fr = {}, {}
    for a, b in pairs:  # every translation of every sentence
        by_en.setdefault(a, set()).add(b)
        by_fr.setdefault(b, set()).add(a)
    for sets in exp.builtin_sets(cfg, log=lambda m: None):
        disc = sets.discovery + sets.discovery_contrast
        held = sets.test + sets.test_contrast
        assert len(sets.discovery) == 20 and len(sets.test) == 10
        seen: set[str] = set()
        for a, b in disc:
            seen |= {a, b} | by_en[a] | by_fr[b]
        for a, b in held:
            assert not ({a, b} | by_en[a] | by_fr[b]) & seen
        concept = exp._pattern(exp.CONCEPTS[sets.name]["en"])
        assert all(concept.search(a) for a, _ in sets.discovery + sets.test)
        every = [exp._pattern(w[lang]) for w in exp.CONCEPTS.values() for lang in exp.LANGS]
        for a, b in sets.discovery_contrast + sets.test_contrast:
            assert not any(p.search(a) or p.search(b) for p in every)
        for (a, _), (c, _) in zip(sets.test, sets.test_contrast, strict=True):
            assert abs(len(a) - len(c)) <= 2  # matched in length


def test_quick_end_to_end(shared_data, tmp_path):
    lines = (shared_data / exp.PAIRS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
    subset = tmp_path / "pairs.tsv"  # every 8th pair: enough concept sentences, less reading
    subset.write_text("".join(lines[::8]), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["experiment", "synapses", "--quick", "--pairs", str(subset), "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "synapses-quick.json").read_text())
    for name in exp.CONCEPTS:
        res = payload["concepts"][name]
        for lang, test_lang in [("en", "en"), ("en", "fr"), ("fr", "en")]:
            t = res[lang][f"test_{test_lang}"]
            assert t["u_opt"] == t["n_concept"] * t["n_contrast"] > 0
            assert t["r"] == pytest.approx(2 * t["u"] / t["u_opt"] - 1)
        assert "r" in res["control"]["test_en"]
    for fig in ("fig11", "fig12", "fig13"):
        assert (out / f"synapses-quick-{fig}.png").stat().st_size > 1000
    assert "shuffled labels" in (out / "synapses-quick.md").read_text()


def test_user_mistakes_are_one_line_errors(capsys, tmp_path):
    assert main(["experiment", "synapses"]) == 1
    assert "needs --ckpt" in capsys.readouterr().err
    assert main(["experiment", "synapses", "--quick", "--concept", str(tmp_path / "c")]) == 1
    assert "--concept and --contrast together" in capsys.readouterr().err
    assert main(["experiment", "synapses", "--ckpt", str(tmp_path / "none")]) == 1
    assert "Traceback" not in capsys.readouterr().err
