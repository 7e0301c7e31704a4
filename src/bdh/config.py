"""Model configuration: a plain dataclass with validation, derived sizes and named presets.

This module imports no torch, so configurations can be read, checked and printed anywhere.
Field names and defaults follow the reference code (`BDHConfig` of pathwaycom/bdh); the options of
SPEC §3 (attention form, damping, no-BPTT, neuron-space residual, Normfree) are off by default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_FORMS = ("auto", "naive", "parallel", "chunked", "recurrent")
RESIDUALS = ("reference", "neuron")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and what is allowed."""


@dataclass
class BDHConfig:
    # --- the reference's fields, with its defaults (SPEC §2) ---
    n_layer: int = 6
    n_embd: int = 256  # D, the paper's d
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128  # N = multiplier * D / n_head neurons per head
    dropout: float = 0.1
    vocab_size: int = 256

    # --- options of SPEC §3, all off by default ---
    # Which exact form computes the linear attention; "auto" picks the fastest for each call.
    attention: str = "auto"
    # Chunk length of the chunked form (and the length above which "auto" switches to it).
    chunk_size: int = 256
    # Per-head ALiBi-like decay λ_h ∈ (0, 1] of the state (paper §6.1): one float for every head,
    # a list of n_head floats, "alibi" for λ_h = exp(−m_h) with ALiBi's slopes m_h = 2^(−8h/nh)
    # (memories fading over 4 … 256 tokens with 4 heads), or None for no damping (λ = 1).
    damping: float | list[float] | str | None = None
    # Learn λ_h (one rate per head, initialised at `damping`) instead of fixing it. Configs saved
    # before this field existed load with False: their λ stays what they were trained with.
    learn_damping: bool = False
    # Detach keys and values inside attention (paper §7.2, "no BPTT").
    no_bptt: bool = False
    # "reference": the d-space residual of the reference code; "neuron": the paper's Eq. 8,
    # a residual in neuron space x_l = x_{l-1} + relu(D_x v_{l-1}).
    residual: str = "reference"
    # False gives BDH-Normfree (paper Eq. 7): every LayerNorm becomes the identity.
    layernorm: bool = True
    # False removes the rotary phases (U = identity), as the graph model of SPEC §4 has none.
    rope: bool = True

    # Extra fields a user attached (e.g. a preset name); kept through JSON round-trips.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "vocab_size"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("chunk_size", self.chunk_size)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if (self.mlp_internal_dim_multiplier * self.n_embd) % self.n_head:
            raise ConfigError(
                f"mlp_internal_dim_multiplier * n_embd ({self.mlp_internal_dim_multiplier}"
                f" * {self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.N % 2:
            raise ConfigError(
                f"neurons per head N = {self.N} must be even (rotary phases act on neuron pairs)"
            )
        if self.attention not in ATTENTION_FORMS:
            raise ConfigError(f"attention must be one of {ATTENTION_FORMS}, got {self.attention!r}")
        if self.residual not in RESIDUALS:
            raise ConfigError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        for name in ("no_bptt", "layernorm", "rope", "learn_damping"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.damping_per_head()  # validates damping
        if self.learn_damping and self.damping is None:
            raise ConfigError("learn_damping needs an initial damping (a float, a list or 'alibi')")

    def damping_per_head(self) -> list[float] | None:
        """λ_h for each head, or None when the state is not damped."""
        d = self.damping
        if d is None:
            return None
        if isinstance(d, str):
            if d != DAMPING_SCHEDULE:
                raise ConfigError(
                    f"damping must be a float, a list of floats, {DAMPING_SCHEDULE!r} or null,"
                    f" got {d!r}"
                )
            return alibi_damping(self.n_head)
        values = [d] * self.n_head if isinstance(d, (int, float)) else list(d)
        if len(values) != self.n_head:
            raise ConfigError(
                f"damping must be one float or a list of n_head={self.n_head} floats,"
                f" got {len(values)} values"
            )
        for lam in values:
            if not (isinstance(lam, (int, float)) and 0.0 < lam <= 1.0 and math.isfinite(lam)):
                raise ConfigError(f"damping values must be in (0, 1], got {lam!r}")
        return [float(lam) for lam in values]

    # ---------------------------------------------------------------- derived sizes
    @property
    def N(self) -> int:
        """Neurons per head."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def n(self) -> int:
        """Total neurons n = n_head * N."""
        return self.n_head * self.N

    @property
    def num_params(self) -> int:
        """3·n·D + 2·V·D (encoders, decoder, embedding, lm_head); independent of n_layer."""
        return 3 * self.n * self.n_embd + 2 * self.vocab_size * self.n_embd

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BDHConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> BDHConfig:
        """Parse a JSON string, or read a JSON file when given a path that exists."""
        text = str(text_or_path)
        path = Path(text)
        if not text.lstrip().startswith("{"):
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BDHConfig:
        """A named preset (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        return cls(**fields)

    def replace(self, **changes: Any) -> BDHConfig:
        return dataclasses.replace(self, **changes)


DAMPING_SCHEDULE = "alibi"


def alibi_damping(n_head: int) -> list[float]:
    """λ_h = exp(−m_h) with ALiBi's geometric slopes m_h = 2^(−8h/n_head), h = 1 … n_head.

    A score over a gap of g tokens is scaled by λ_h^g = exp(−m_h·g): exactly ALiBi's additive
    penalty −m_h·g applied to BDH's (non-softmax) scores, so each head forgets at its own rate.
    """
    return [math.exp(-(2.0 ** (-8.0 * h / n_head))) for h in range(1, n_head + 1)]


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# Named presets. `reference` has the paper's published shape (25,296,896 parameters); `small` is
# shaped for what 2 CPU cores learn in minutes (fewer neurons, shallower); `tiny` is for tests.
# Every preset damps the state with ALiBi's per-head schedule, so that a model keeps reading and
# writing past its training length (it adds no parameter). Measured on `small` with the
# quickstart's settings for the same 194 steps (benchmarks/quickstart_defaults.py): undamped, its
# loss read as a 4,096-byte stream climbs with position from 3.10 to 4.49 bits/byte (its state
# only ever sums, and it was trained on 64-byte windows); damped, it stays at 2.77-2.80 from
# position 64 to 4,096, and the windows loss is better too (2.802 vs 2.902). At the 360k size
# (`bdh experiment length`, README "Length") a learned per-head decay started from this schedule
# was 0.004 (windows) and 0.011 (stream) bits/byte better, within what one seed resolves: the
# fixed schedule stays, with no extra parameters and λ readable from the config (the decoding
# state and the graph form's retention take it from there), and carrying the state across
# batches without damping learned the windows task much worse (3.93 vs 2.84 bits/byte).
# The paper's code as published has no damping: `damping=None` (`--config` {"damping": null})
# gives it exactly, and what is compared with that code (tests, bench_train) passes it.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"damping": DAMPING_SCHEDULE},
    # 1.2M parameters, n = 1,920 neurons. Chosen by training on Shakespeare bytes at T = 64 for
    # equal CPU time: fewer neurons and layers learn more per second on 2 cores than a bigger n
    # (whose (B, nh, T, N) activations stop fitting in cache), and D = 192 learns more per step
    # than D = 128 at the same cost. scripts/quickstart.sh (5 minutes of training, batch 16 x 64)
    # reached 2.34 validation bits/byte on the default corpus on an idle machine (README).
    "small": {
        "n_layer": 3,
        "n_embd": 192,
        "n_head": 4,
        "mlp_internal_dim_multiplier": 10,
        "dropout": 0.0,
        "damping": DAMPING_SCHEDULE,
    },
    "tiny": {
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "mlp_internal_dim_multiplier": 8,
        "dropout": 0.0,
        "chunk_size": 16,
        "damping": DAMPING_SCHEDULE,
    },
}
