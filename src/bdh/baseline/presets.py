"""Parameter-matched BDH / GPT pairs for the scaling comparison (paper Fig. 7), for 2 CPU cores.

The rule, following the paper (§4.2, Fig. 7):

- **BDH grows only n, the number of neurons.** D, n_head and n_layer stay fixed (here D=128,
  nh=4, L=4, bytes V=256); only `mlp_internal_dim_multiplier` changes, so n = multiplier·D and the
  parameter count is 3·n·D + 2·V·D (weights are shared across layers, so L does not enter it).
- **GPT grows width and depth together**, as the GPT-2 family does, with heads of 32-48
  dimensions, ALiBi positions (the paper's baseline; no position table to count) and a tied
  output head.
- **Matched** means the two total parameter counts agree within MATCH_TOLERANCE (3%). Each GPT
  shape was chosen first on the (depth, width) ladder; the BDH multiplier is then the integer that
  brings BDH closest to it. `tests/test_gpt.py` checks every pair.

Two ladders: `LADDER` (≈0.36M, 1M, 3M, 10M) and `QUICK_LADDER` (≈70k-470k; a smoke test for CI
that runs in seconds and says nothing about scaling). On 2 shared CPU cores the scaling experiment
runs 360k/1m/3m by default: BDH at 10M trains at ~50 tokens/s there, too slow for a useful budget.

Every ladder name is also a `--preset` of both models (`preset_config`), so
`bdh train --model gpt --preset 1m` trains the GPT that `--model bdh --preset 1m` is matched with.

Per-token compute differs a lot at equal parameters: BDH re-applies its shared weights L times and
its attention runs in the neuron dimension n, so it spends ~5x the FLOPs of the matched GPT per
token (see `flops_per_token`).
"""

from __future__ import annotations

from typing import Any

from bdh.baseline.gpt import GPT_PRESETS, GPTConfig
from bdh.config import DAMPING_SCHEDULE, BDHConfig, ConfigError
from bdh.config import PRESETS as BDH_PRESETS

MATCH_TOLERANCE = 0.03

# BDH's state is damped with ALiBi's per-head schedule, as its GPT's attention is by ALiBi itself
# (and as every BDH preset is: see bdh.config.PRESETS). Damping adds no parameter.
_DAMPED: dict[str, Any] = {"dropout": 0.0, "damping": DAMPING_SCHEDULE}
_BDH_BASE: dict[str, Any] = {"n_layer": 4, "n_embd": 128, "n_head": 4, **_DAMPED}
_BDH_QUICK: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "n_head": 2, **_DAMPED}
_GPT_BASE: dict[str, Any] = {"position": "alibi", "dropout": 0.0}

# size -> (BDH multiplier, GPT (n_layer, n_embd, n_head))
LADDER: dict[str, tuple[int, tuple[int, int, int]]] = {
    "360k": (6, (3, 96, 3)),  # BDH n=768: 360,448 params; GPT 360,288
    "1m": (20, (4, 144, 4)),  # BDH n=2,560: 1,048,576 params; GPT 1,039,968
    "3m": (54, (6, 192, 6)),  # BDH n=6,912: 2,719,744 params; GPT 2,718,720
    "10m": (201, (8, 320, 8)),  # BDH n=25,728: 9,945,088 params; GPT 9,946,240
}
QUICK_LADDER: dict[str, tuple[int, tuple[int, int, int]]] = {
    "q70k": (3, (2, 48, 2)),  # BDH 69,632; GPT 68,928
    "q170k": (11, (3, 64, 2)),  # BDH 167,936; GPT 166,464
    "q470k": (36, (4, 96, 4)),  # BDH 475,136; GPT 472,128
}


def sizes(quick: bool = False) -> list[str]:
    """Size names of a ladder, smallest first."""
    return list(QUICK_LADDER if quick else LADDER)


def matched_pair(size: str, **common: Any) -> tuple[BDHConfig, GPTConfig]:
    """The BDH and GPT configs of one ladder size; `common` (e.g. dropout=0.1) applies to both."""
    ladders = {**LADDER, **QUICK_LADDER}
    if size not in ladders:
        raise ConfigError(f"unknown ladder size {size!r}; choose one of {', '.join(ladders)}")
    multiplier, (n_layer, n_embd, n_head) = ladders[size]
    base = _BDH_QUICK if size in QUICK_LADDER else _BDH_BASE
    bdh = BDHConfig(**{**base, "mlp_internal_dim_multiplier": multiplier, **common})
    gpt = GPTConfig(
        **{**_GPT_BASE, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, **common}
    )
    return bdh, gpt


def preset_config(config_class: type, name: str, **fields: Any) -> Any:
    """The config of a named preset of `config_class` (BDHConfig or GPTConfig), where a ladder
    size is a preset of both models; `fields` (e.g. vocab_size) override the preset's."""
    named = {BDHConfig: BDH_PRESETS, GPTConfig: GPT_PRESETS}.get(config_class)
    ladders = {**LADDER, **QUICK_LADDER}
    if named is None:  # another model kind: only its own presets
        return config_class.from_name(name, **fields)
    if name in named:
        return config_class.from_name(name, **fields)
    if name not in ladders:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {', '.join(named)}"
            f" or a ladder size: {', '.join(ladders)}"
        )
    bdh, gpt = matched_pair(name)
    base = bdh if config_class is BDHConfig else gpt
    # from_dict, not replace: an unknown field in a --config file is a one-line ConfigError.
    return config_class.from_dict({**base.to_dict(), **fields})


def param_gap(bdh: BDHConfig, gpt: GPTConfig) -> float:
    """Relative parameter difference (GPT − BDH) / BDH."""
    return (gpt.num_params - bdh.num_params) / bdh.num_params


def flops_per_token(config: BDHConfig | GPTConfig, context: int, training: bool = True) -> float:
    """Matrix-multiply FLOPs per token (2 per multiply-add) at `context` tokens per sequence.

    Causal attention is counted at the average context (context+1)/2 a token sees; training counts
    3x the forward pass (forward + backward for inputs and weights). Elementwise work is ignored.
    """
    c = (context + 1) / 2
    V, D, L = config.vocab_size, config.n_embd, config.n_layer
    if isinstance(config, BDHConfig):
        n = config.n
        # encoder, encoder_v, decoder (3·n·D) + scores in neuron space (c·n) + values (c·nh·D)
        per_layer = 3 * n * D + c * n + c * config.n_head * D
    else:
        # qkv + output projection (4D²) + MLP (8D²) + scores and values (2·c·D)
        per_layer = 12 * D * D + 2 * c * D
    forward = 2 * (L * per_layer + D * V)
    return 3 * forward if training else forward
