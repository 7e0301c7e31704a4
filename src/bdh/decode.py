"""The decoding engine: one token at a time at the cost of the bytes it cannot avoid.

Notation: B streams, t tokens fed at once, nh heads, N neurons per head, n = nh·N, D = n_embd,
V vocabulary, L layers, T* the key-value/state crossover (`bdh.ops.kv.crossover`).

`Decoder(model).step(idx, state)` computes exactly what `model(idx)` computes for those positions
(SPEC §2), choosing per call and per layer the cheapest exact way:

- one token from the state S: the recurrent step of SPEC §3, dense or *sparse-active* (only the
  rows of S, of D_y and of E that belong to firing neurons are read and written; `bdh.ops.sparse`),
  chosen by the density measured at that step;
- below T* tokens of context, a key-value cache instead of S (`bdh.ops.kv`), folded into S when the
  context reaches T*;
- several tokens (prefill): the model's exact attention forms in pieces of `prefill_chunk` tokens,
  so a prompt of any length is read in bounded memory;
- streams at different positions (prompts of different lengths): per-stream rotary phases.

The layer itself is `bdh.trunk`'s, shared with training: this engine supplies only its products
(`_OneToken`, `_Tokens`), so the named activation points of `bdh.interpret` fire here as in
`model(idx)`. Decoding is inference: with autograd on (truncated BPTT) `model.step` runs the
model's differentiable pass instead. Weights may be kept in bfloat16 for decoding; the state
stays float32.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdh import trunk
from bdh.ops import cpu_kernels
from bdh.ops.common import state_dtype
from bdh.ops.kv import KVCache, crossover, kv_chunk, kv_token
from bdh.ops.rope import cos_sin, rotate
from bdh.ops.sparse import (
    density,
    state_step_dense,
    state_step_sparse,
    y_path_dense,
    y_path_sparse,
)
from bdh.state import BDHState

CHOICES = ("auto", "dense", "sparse")
KV_CHOICES = ("auto", "on", "off")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "model": None}
KERNELS = ("torch", "cpp")
# Default density limits of the automatic sparse/dense choice (measured, see DecodeOptions).
SPARSE_LIMIT_CPP = 0.5
SPARSE_LIMIT_TORCH = 0.3
SPARSE_TORCH_MIN_SIZE = 2**21  # n·D of a layer
# A one-token step whose state holds fewer values per layer (B·n·D) than this runs on one thread.
ONE_THREAD_BELOW = 2**21


@dataclass(frozen=True)
class DecodeOptions:
    """How the engine decodes; every choice gives the same logits up to float rounding."""

    # Read/write of the state (or cache) and the y-path: "auto" picks sparse when the measured
    # density of the step is at most `max_sparse_density`. None = the limits measured on a
    # 2-core CPU: with the fused kernels sparse wins up to ~50% active rows; with torch
    # ops only on large layers (n·D ≥ 2M) and up to 30% — below that the gathers cost more than
    # the rows they save.
    attention: str = "auto"
    y_path: str = "auto"
    max_sparse_density: float | None = None
    # Key-value cache below the crossover T* (states made by `Decoder.init_state`): "on", "off",
    # or "auto" = on with the torch sparse step, off with the fused kernels. Measured on 2 cores:
    # below T* the cache beats the dense and the torch-sparse state steps, but the fused sparse
    # step beats the cache at every context; the cache stays the smaller one below T*.
    kv: str = "auto"
    kv_crossover: int | None = None  # None: T* = n·D/(n + D)
    # Longest piece of a prompt read at once (bounds prefill memory).
    prefill_chunk: int = 256
    # "model" keeps the model's weights; "bfloat16" halves the weight bytes read per token.
    weights: str = "model"
    # Sparse steps in torch ops, or in fused C++ kernels ("cpp": one pass over the active rows,
    # compiled on first use, ~30 s; `bdh.ops.cpu_kernels`). Default: $BDH_KERNELS or torch.
    kernels: str = field(default_factory=lambda: os.environ.get("BDH_KERNELS", "torch"))
    # Threads of a one-token step. None = auto: one thread when a layer's state is small
    # (B·n·D < ONE_THREAD_BELOW), torch's setting otherwise; 0 = always torch's setting. Waking a
    # second thread costs tens of µs per parallel op (more with OMP_WAIT_POLICY=PASSIVE, the
    # setting for a shared machine), as much as a small model's whole op: measured on 2 cores,
    # the trained `small` preset's sparse step took 0.47 ms on one thread and 0.88 ms on two.
    # torch's thread count is process-wide: a step that changes it restores it before returning,
    # but torch work in other Python threads meanwhile sees it; 0 never touches it.
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("attention", "y_path"):
            if getattr(self, name) not in CHOICES:
                raise ValueError(f"{name} must be one of {CHOICES}, got {getattr(self, name)!r}")
        if self.kv not in KV_CHOICES:
            raise ValueError(f"kv must be one of {KV_CHOICES}, got {self.kv!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {tuple(WEIGHT_DTYPES)}, got {self.weights!r}")
        if self.max_sparse_density is not None and not 0.0 <= self.max_sparse_density <= 1.0:
            raise ValueError(f"max_sparse_density must be in [0, 1], got {self.max_sparse_density}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be ≥ 1, got {self.prefill_chunk}")
        if self.kv_crossover is not None and self.kv_crossover < 1:
            raise ValueError(f"kv_crossover must be ≥ 1, got {self.kv_crossover}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"threads must be ≥ 0 or None, got {self.threads}")


# ---------------------------------------------------------------------- weights for decoding
@dataclass
class DecodeWeights:
    """The model's weights as decoding reads them (views of the parameters, or bf16 copies)."""

    embed: Tensor  # (V, D)
    encoder: Tensor  # (nh, D, N)  D_x
    encoder_v: Tensor  # (nh, D, N)  D_y
    decoder: Tensor  # (n, D)  E, head-major rows
    lm_head: Tensor  # (D, V)
    encoder_v_rows: Tensor | None = None  # (n, D) D_y transposed: active neurons gather rows

    def rows_of_encoder_v(self) -> Tensor:
        """D_y with one contiguous row per neuron, made on first use (n·D extra floats)."""
        if self.encoder_v_rows is None:
            nh, D, N = self.encoder_v.shape
            self.encoder_v_rows = self.encoder_v.transpose(1, 2).reshape(nh * N, D).contiguous()
        return self.encoder_v_rows


_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[Any, DecodeWeights]]] = (
    weakref.WeakKeyDictionary()
)


def decode_weights(model: nn.Module, dtype: torch.dtype | None = None) -> DecodeWeights:
    """Weights for decoding, cached per model and dtype until a parameter changes in place."""
    params = (model.embed.weight, model.encoder, model.encoder_v, model.decoder, model.lm_head)
    # _version counts in-place writes (optimizer steps, load_state_dict): a stale copy is rebuilt.
    version = tuple((p.data_ptr(), p._version) for p in params)
    cache = _WEIGHTS.setdefault(model, {})  # dtype → (version, weights)
    if dtype not in cache or cache[dtype][0] != version:
        tensors = [p.detach() if dtype is None else p.detach().to(dtype) for p in params]
        cache[dtype] = (version, DecodeWeights(*tensors))
    return cache[dtype][1]


# ---------------------------------------------------------------------- the engine
class Decoder:
    """Decodes a BDH model exactly, with sparse-active steps, a KV path and chunked prefill."""

    def __init__(self, model: nn.Module, options: DecodeOptions | None = None) -> None:
        self.model = model
        self.options = options or DecodeOptions()
        self.config = model.config
        self.act_dtype = state_dtype(model.lm_head.dtype)  # the stream and the state
        # Densities of the last decoded token, per layer: {"x", "k", "y"} and the paths taken.
        self.last_stats: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ states
    @property
    def crossover(self) -> int:
        c = self.config
        return self.options.kv_crossover or crossover(c.n, c.n_embd)

    @property
    def uses_kv(self) -> bool:
        """Whether new states start as a key-value cache (see DecodeOptions.kv)."""
        if self.options.kv == "auto":
            return self.options.kernels != "cpp"
        return self.options.kv == "on"

    def init_state(self, batch_size: int = 1) -> BDHState:
        """An empty state; a key-value cache while the context is below the crossover."""
        c = self.config
        damping = self.model.attn.damping
        if not self.uses_kv:
            state = self.model.init_state(batch_size)
            state.damping = damping
            return state
        kv = KVCache.zeros(
            c.n_layer,
            batch_size,
            c.n_head,
            c.N,
            c.n_embd,
            self.crossover,
            device=self.model.lm_head.device,
            dtype=self.act_dtype,
        )
        return BDHState([], 0, None, kv, damping)

    # ------------------------------------------------------------------ public steps
    def step(self, idx: Tensor, state: BDHState) -> Tensor:
        """Feed idx (B, t) at the state's position(s); returns logits (B, t, V), state advanced.

        Inference only: no autograd (use `model.step` to train through the state).
        """
        check_ids(idx, state, self.config.vocab_size)
        with torch.no_grad(), _threads(self._step_threads(idx)):
            return self._step(idx, state)

    def _step_threads(self, idx: Tensor) -> int:
        """Threads for feeding idx (0: torch's setting); see DecodeOptions.threads."""
        if idx.shape[1] > 1:  # prefill: large products that threads do speed up
            return 0
        if self.options.threads is not None:
            return self.options.threads
        c = self.config
        return 1 if idx.shape[0] * c.n * c.n_embd < ONE_THREAD_BELOW else 0

    def prefill(self, idx: Tensor, state: BDHState) -> Tensor:
        """Read a prompt of any length in bounded memory; returns the last logits (B, V)."""
        check_ids(idx, state, self.config.vocab_size)
        last = None
        for start in range(0, idx.shape[1], self.options.prefill_chunk):
            last = self.step(idx[:, start : start + self.options.prefill_chunk], state)[:, -1]
        if last is None:
            raise ValueError("idx is empty: need at least one token")
        return last

    def _step(self, idx: Tensor, state: BDHState) -> Tensor:
        t = idx.shape[1]
        if state.kv is not None and state.kv.length + t > state.kv.capacity:
            state.materialise()  # the context reached T*: S is now smaller and cheaper
        if state.kv is not None:
            return self._token(idx, state) if t == 1 else self._tokens(idx, state)
        if t == 1:
            return self._token(idx, state)
        return self._prefill_state(idx, state)

    # ------------------------------------------------------------------ several tokens into S
    def _prefill_state(self, idx: Tensor, state: BDHState) -> Tensor:
        """The trunk in pieces of at most prefill_chunk tokens (bounded memory)."""
        if state.ragged:
            return torch.cat([self._prefill_row(idx, state, b) for b in range(idx.shape[0])])
        size = self.options.prefill_chunk
        pieces = [self._tokens(idx[:, s : s + size], state) for s in range(0, idx.shape[1], size)]
        return torch.cat(pieces, dim=1)

    def _prefill_row(self, idx: Tensor, state: BDHState, b: int) -> Tensor:
        """Stream b alone, at its own position, written back into the batched state."""
        assert state.row_pos is not None
        row = BDHState([S[b : b + 1] for S in state.layers], int(state.row_pos[b]))
        logits = self._prefill_state(idx[b : b + 1], row)
        for S, new in zip(state.layers, row.layers, strict=True):
            S[b : b + 1].copy_(new)
        state.row_pos[b] = row.pos
        state.pos = int(state.row_pos.max())
        return logits

    # ------------------------------------------------------------------ one token
    def _token(self, idx: Tensor, state: BDHState) -> Tensor:
        """One token per stream through all layers; idx (B, 1) → logits (B, 1, V)."""
        logits = trunk.run(_OneToken(self, state), self.config, idx, self.model._hooks)
        _advance(state, 1)
        return logits

    def _phases(self, state: BDHState) -> tuple[Tensor, Tensor] | None:
        """cos, sin at each stream's position, (B or 1, 1, N): every stream may be elsewhere."""
        if not self.config.rope:
            return None
        freqs = self.model.attn.freqs
        if not state.ragged:
            cos, sin = cos_sin(freqs, state.pos, 1)  # the very arithmetic of the other forms
            return cos.view(1, 1, -1), sin.view(1, 1, -1)
        pairs = [cos_sin(freqs, int(p), 1) for p in state.positions()]
        cos = torch.cat([p[0] for p in pairs]).unsqueeze(1)
        return cos, torch.cat([p[1] for p in pairs]).unsqueeze(1)

    def _sparse(self, choice: str, measured: float) -> bool:
        """Sparse or dense for this step, from the density just measured (see DecodeOptions)."""
        if choice != "auto":
            return choice == "sparse"
        limit = self.options.max_sparse_density
        if limit is None:
            if self.options.kernels == "cpp":
                limit = SPARSE_LIMIT_CPP
            elif self.config.n * self.config.n_embd >= SPARSE_TORCH_MIN_SIZE:
                limit = SPARSE_LIMIT_TORCH
            else:
                return False
        return measured <= limit

    def _attend(
        self, layer: int, k: Tensor, v: Tensor, state: BDHState, stats: dict[str, Any]
    ) -> Tensor:
        """Read the context with key k (B, nh, N), then write k ⊗ v: → (B, nh, D)."""
        B, nh, N = k.shape
        damping = state.damping if state.damping is not None else self.model.attn.damping
        sparse = self._sparse(self.options.attention, stats["k"])
        if state.kv is not None:
            kv = state.kv
            stats["attention"] = "kv-sparse" if sparse else "kv-dense"
            return kv_token(
                k, v, kv.keys[layer], kv.values[layer], kv.length, damping, sparse=sparse
            )
        S = _contiguous_state(state, layer)  # (B, nh, N, D)
        G, D = B * nh, S.shape[-1]
        kg, vg = k.reshape(G, N), v.unsqueeze(1).expand(B, nh, D).reshape(G, D)
        if damping is not None:  # λS touches every row: the dense step
            stats["attention"] = "dense-damped"
            out = (kg.unsqueeze(1) @ S.view(G, N, D)).squeeze(1)  # read before the decay
            S.mul_(damping.to(S.dtype).view(1, nh, 1, 1))
            S.view(G, N, D).addcmul_(kg.unsqueeze(2), vg.unsqueeze(1))
        elif sparse and self._cpp(S):
            stats["attention"] = "sparse"
            out = cpu_kernels.state_step(kg, vg, S.view(G, N, D))
        elif sparse:
            stats["attention"] = "sparse"
            out = state_step_sparse(kg, vg, S.view(G, N, D))
        else:
            stats["attention"] = "dense"
            out = state_step_dense(kg, vg, S.view(G, N, D))
        return out.view(B, nh, D)

    def _y_path(self, w: DecodeWeights, x: Tensor, a: Tensor, stats: dict[str, Any]) -> Tensor:
        """u = (x ⊙ relu(a D_y)) E: (B, D), on the active neurons when x is sparse enough."""
        if self._sparse(self.options.y_path, stats["x"]):
            y_path = cpu_kernels.y_path if self._cpp(x) else y_path_sparse
            u, stats["y"] = y_path(x, a, w.rows_of_encoder_v(), w.decoder)
            stats["y_path"] = "sparse"
        else:
            u, stats["y"] = y_path_dense(x, a, w.encoder_v, w.decoder)
            stats["y_path"] = "dense"
        return u.to(self.act_dtype)

    # ------------------------------------------------------------------ several tokens
    def _tokens(self, idx: Tensor, state: BDHState) -> Tensor:
        """t tokens read into the state or the key-value cache: → (B, t, V)."""
        logits = trunk.run(_Tokens(self, state), self.config, idx, self.model._hooks)
        _advance(state, idx.shape[1])
        return logits

    # ------------------------------------------------------------------ helpers
    def _cpp(self, t: Tensor) -> bool:
        """Use the fused kernels: asked for, float32 activations on the CPU (else torch ops)."""
        return self.options.kernels == "cpp" and t.dtype == torch.float32 and cpu_kernels.usable(t)

    def _weights(self) -> DecodeWeights:
        return decode_weights(self.model, WEIGHT_DTYPES[self.options.weights])


class _OneToken:
    """The products of a one-token step (`bdh.trunk`): (B, D) and (B, nh, N) tensors, the
    state or cache read and written in place, sparse rows and fused kernels where they pay."""

    single = True

    def __init__(self, decoder: Decoder, state: BDHState) -> None:
        self.decoder, self.state, self.w = decoder, state, decoder._weights()
        self.phases = decoder._phases(state)
        self.stats: list[dict[str, Any]] = []
        decoder.last_stats = self.stats  # one dict per layer: densities and paths taken

    def embed(self, idx: Tensor) -> Tensor:
        return self.w.embed[idx[:, 0]].to(self.decoder.act_dtype)  # (B, D)

    def neurons(self, v: Tensor) -> Tensor:
        if self.decoder._cpp(v):  # one streaming pass; torch bf16 gemv is slow
            return cpu_kernels.encode(v, self.w.encoder)  # (B, nh, N)
        return F.relu(_mm(v, self.w.encoder).transpose(0, 1))  # (nh, B, N) → (B, nh, N)

    def attend(self, layer: int, x: Tensor, v: Tensor) -> Tensor:
        k = x if self.phases is None else rotate(x, *self.phases)  # rope_t(x_t), (B, nh, N)
        stats = {"x": density(x), "k": density(k)}
        self.stats.append(stats)
        return self.decoder._attend(layer, k, v, self.state, stats)  # (B, nh, D)

    def scores_y(self, a: Tensor) -> Tensor:
        return _mm(a.transpose(0, 1), self.w.encoder_v).transpose(0, 1)  # (B, nh, N)

    def decode(self, y: Tensor) -> Tensor:
        y = y.reshape(y.shape[0], -1)  # (B, n), head-major like E's rows
        self.stats[-1] |= {"y": density(y.any(0)), "y_path": "dense"}
        return _mm(y, self.w.decoder)  # (B, D)

    def y_path(self, x: Tensor, a: Tensor) -> Tensor:
        return self.decoder._y_path(self.w, x, a, self.stats[-1])

    def head(self, v: Tensor) -> Tensor:
        return _mm(v, self.w.lm_head).unsqueeze(1)  # (B, 1, V)


class _Tokens:
    """The products of reading t tokens (`bdh.trunk`): (B, 1, t, D) and (B, nh, t, N) tensors;
    the attention against the key-value cache or, from the state, in the model's exact forms."""

    single = False

    def __init__(self, decoder: Decoder, state: BDHState) -> None:
        self.decoder, self.state, self.w = decoder, state, decoder._weights()
        self.attn = decoder.model.attn

    def embed(self, idx: Tensor) -> Tensor:
        return self.w.embed[idx].to(self.decoder.act_dtype).unsqueeze(1)  # (B, 1, t, D)

    def neurons(self, v: Tensor) -> Tensor:
        return F.relu(_mm(v, self.w.encoder))  # (B, nh, t, N)

    def attend(self, layer: int, x: Tensor, v: Tensor) -> Tensor:
        state, kv = self.state, self.state.kv
        if kv is not None:
            freqs = self.attn.freqs if self.decoder.config.rope else None
            return kv_chunk(x, v, freqs, kv.keys[layer], kv.values[layer], kv.length, state.damping)
        a, state.layers[layer] = self.attn(x, v, state.layers[layer], state.pos, need_state=True)
        return a

    def scores_y(self, a: Tensor) -> Tensor:
        return _mm(a, self.w.encoder_v)  # (B, nh, t, N)

    def decode(self, y: Tensor) -> Tensor:
        """Σ_h y_h E_h summed in the activations' precision, as the training pass sums it."""
        nh, N = y.shape[1], y.shape[3]
        return _mm(y, self.w.decoder.view(nh, N, -1)).sum(1, keepdim=True)  # (B, 1, t, D)

    def y_path(self, x: Tensor, a: Tensor) -> Tensor:
        return self.decode(trunk.gate(x, self.scores_y(a)))

    def head(self, v: Tensor) -> Tensor:
        return _mm(v[:, 0], self.w.lm_head)  # (B, t, V)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block on n torch threads (0: unchanged), restoring the process-wide setting on
    exit, errors included."""
    before = torch.get_num_threads()
    if n < 1 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mm(a: Tensor, w: Tensor) -> Tensor:
    """a @ w in the weights' precision, back to a's (float32) precision."""
    return (a.to(w.dtype) @ w).to(a.dtype)


def _advance(state: BDHState, t: int) -> None:
    state.pos += t
    if state.row_pos is not None:
        state.row_pos += t
    if state.kv is not None:
        state.kv.length += t


def _contiguous_state(state: BDHState, layer: int) -> Tensor:
    S = state.layers[layer]
    if not S.is_contiguous():
        S = state.layers[layer] = S.contiguous()
    return S


def needs_autograd(model: nn.Module) -> bool:
    """Training through the state (truncated BPTT) and dropout need the differentiable trunk."""
    if model.training and model.config.dropout > 0:
        return True
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


def check_ids(idx: Tensor, state: BDHState, vocab_size: int) -> None:
    """One-line errors for the mistakes a caller can make with the ids or the state."""
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"idx must be (B, t) integer token ids, got {tuple(idx.shape)} {idx.dtype}"
        )
    if idx.shape[0] != state.batch_size:
        raise ValueError(
            f"idx has batch size {idx.shape[0]} but the state holds {state.batch_size} streams"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        bad = int(idx.max()) if int(idx.max()) >= vocab_size else int(idx.min())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
