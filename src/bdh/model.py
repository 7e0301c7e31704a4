"""BDH-GPU (SPEC §2), read top to bottom in the paper's order.

Notation: B batch, T tokens, D = n_embd (the paper's d), nh heads, N neurons per head, n = nh·N,
V vocabulary, L layers. Weights are shared by all layers; names follow the reference code so its
checkpoints load (`encoder` = D_x, `encoder_v` = D_y, `decoder` = E, transposed and split by head).

    v  = LN(embed(idx))                          # (B, 1, T, D) residual stream
    L times:
        x  = relu(v @ D_x)                       # (B, nh, T, N) sparse positive neurons
        a  = LN(attention(x, v))                 # (B, nh, T, D) linear attention, keys = x
        y  = relu(a @ D_y) * x                   # (B, nh, T, N) gated, sparser still
        v  = LN(v + LN(concat_heads(y) @ E))     # (B, 1, T, D)
    logits = v @ lm_head

The loop itself is `bdh.trunk`'s, shared with the decoding engine; this module supplies the
training pass's products (`_Forward`) and the named activation points' entry points
(`run_with_cache`, `run_with_hooks`; `bdh.interpret`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import bdh.interpret as _interpret
from bdh import decode as _decode
from bdh import generate as _generate
from bdh import trunk as _trunk
from bdh.config import BDHConfig
from bdh.ops import FORMS, chunked, frequencies, parallel
from bdh.ops.common import cheapest_form, keep_mask, state_dtype
from bdh.ops.rope import RotaryTable, phase_dtype
from bdh.state import BDHState


class Attention(nn.Module):
    """Holds the per-neuron rotary frequencies and runs the attention in the configured form.

    `freqs` is a saved buffer (reference layout (1, 1, 1, N)) rather than recomputed, so a model
    whose neurons are concatenated or grown keeps every neuron's own frequency.
    """

    def __init__(self, config: BDHConfig) -> None:
        super().__init__()
        self.config = config
        self.freqs = nn.Buffer(frequencies(config.N).view(1, 1, 1, config.N))
        damping = config.damping_per_head()
        # λ_h is derived from the config, so it is not saved with the weights.
        self.register_buffer(
            "fixed_damping", None if damping is None else torch.tensor(damping), persistent=False
        )
        if config.learn_damping:
            # λ_h = exp(−r_h exp(δ_h)), r_h = −ln λ_h of the config: any δ keeps λ in (0, 1), and
            # the optimizer's weight decay pulls δ back to 0, i.e. to the configured schedule.
            self.damping_delta = nn.Parameter(torch.zeros(config.n_head))

    @property
    def damping(self) -> Tensor | None:
        """λ_h (nh,) of this model, or None without damping."""
        if not self.config.learn_damping:
            return self.fixed_damping
        rate = -self.fixed_damping.clamp(max=1.0 - 1e-6).log()  # a configured λ = 1 can still learn
        return torch.exp(-rate * self.damping_delta.exp())

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Attention:
        """`model.to(torch.bfloat16)` casts buffers too: keep the phases' inputs in float32."""
        kept = {name: getattr(self, name) for name in ("freqs", "fixed_damping")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after is not None and after.dtype != phase_dtype(after.dtype):
                setattr(self, name, before.to(after.device, phase_dtype(after.dtype)))
        return self

    def form(self, T: int, has_state: bool) -> str:
        """The form to use: the configured one, or under "auto" the fastest exact one for T."""
        chosen = self.config.attention
        if chosen != "auto":
            return chosen
        if T == 1 and has_state:
            return "recurrent"
        return "parallel" if T <= self.config.chunk_size else "chunked"

    def forward(
        self, x: Tensor, v: Tensor, state: Tensor | None, offset: int, need_state: bool
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, nh, T, N), v (B, 1, T, D), state (B, nh, N, D) → (B, nh, T, D), new state."""
        form = self.form(x.shape[2], state is not None)
        kwargs: dict[str, Any] = {"detach_kv": self.config.no_bptt}
        if form == "chunked":
            kwargs |= {"chunk_size": self.config.chunk_size, "need_state": need_state}
        elif form == "parallel":
            kwargs["need_state"] = need_state
        elif form == "recurrent":
            kwargs["inplace"] = _can_update_in_place(state, x)
        freqs = self.freqs if self.config.rope else None
        return FORMS[form](x, v, freqs, state, offset, self.damping, **kwargs)


def _can_update_in_place(state: Tensor | None, x: Tensor) -> bool:
    """Decoding updates the state where it lies; training keeps it functional for autograd."""
    return (
        state is not None
        and not torch.is_grad_enabled()
        and state.dtype == state_dtype(x.dtype)
        and state.is_contiguous()
    )


class BDH(nn.Module):
    """The BDH-GPU language model: `model(idx, targets)` gives `(logits, loss)`."""

    def __init__(self, config: BDHConfig) -> None:
        super().__init__()
        self.config = config
        nh, D, N, V = config.n_head, config.n_embd, config.N, config.vocab_size
        self.decoder = nn.Parameter(torch.empty(nh * N, D))  # E: neurons → D, head-major rows
        self.encoder = nn.Parameter(torch.empty(nh, D, N))  # D_x: D → neurons, x-path
        self.attn = Attention(config)
        self.embed = nn.Embedding(V, D)
        self.drop = nn.Dropout(config.dropout)
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N))  # D_y: D → neurons, y-path
        self.lm_head = nn.Parameter(torch.empty(D, V))
        # Recompute each layer's activations in the backward pass instead of keeping them:
        # same results, roughly one extra forward of compute for a fraction of the memory.
        self.recompute = False
        # Hooks on the named activation points (`bdh.interpret`): name → functions. Empty, the
        # trunk skips every point with one truth test.
        self._hooks: _trunk.Hooks = {}
        self.reset_parameters()
        # Reference checkpoints come from torch.compile'd models with keys prefixed `_orig_mod.`.
        self.register_load_state_dict_pre_hook(_strip_compile_prefix)

    def reset_parameters(self) -> None:
        """Every weight ~ N(0, 0.02²), as in the reference."""
        for p in (self.decoder, self.encoder, self.encoder_v, self.embed.weight, self.lm_head):
            nn.init.normal_(p, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ the forward pass
    def forward(
        self, idx: Tensor, targets: Tensor | None = None, state: BDHState | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids → logits (B, T, V) and the next-token cross-entropy if targets.

        With a state, the tokens continue the streams it holds (at state.pos) and it is advanced
        in place: training through a state carried from batch to batch (paper App. B). Going
        through `forward` keeps wrappers such as DistributedDataParallel in the loop.
        """
        if state is not None and (state.kv is not None or state.ragged):
            raise ValueError("a key-value or ragged state is for decoding only: use model.step")
        logits = self._run(idx, state)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def _run(self, idx: Tensor, state: BDHState | None) -> Tensor:
        """SPEC §2 through `bdh.trunk`; with a state, continue at state.pos and advance it."""
        self._check_ids(idx)
        T = idx.shape[1]
        offset = 0 if state is None else state.pos
        engine = _Forward(self, state, offset, T)
        hooks = self._hooks
        # Recompute each layer's activations in the backward pass, keeping only its inputs.
        # Not with hooks set: the recomputation would call them a second time.
        wrap = None
        if self.recompute and torch.is_grad_enabled() and not hooks:
            wrap = partial(checkpoint, use_reentrant=False)
        logits = _trunk.run(engine, self.config, idx, hooks, wrap)
        if state is not None:
            state.layers[:] = engine.new_states
            state.pos += T
        return logits

    def _rotary(self, offset: int, T: int) -> RotaryTable | None:
        """The rotation of positions offset .. offset+T−1, or None without rotary phases."""
        return RotaryTable(self.attn.freqs, offset, T) if self.config.rope else None

    def _attend(
        self, x: Tensor, v: Tensor, S: Tensor | None, offset: int, rotary: RotaryTable | None
    ) -> tuple[Tensor, Tensor | None]:
        """Linear attention of x over v; training and scoring take the cheapest exact form.

        An explicitly configured form, and decoding (a state without autograd), go through
        `Attention`; otherwise the keys are rotated once with the shared table and the masked
        (block-causal) or chunked form is chosen by its cost for this T (`ops.cheapest_form`).
        """
        c = self.config
        if c.attention != "auto" or (S is not None and not torch.is_grad_enabled()):
            return self.attn(x, v, S, offset, need_state=S is not None)
        q = x if rotary is None else rotary.apply(x)  # (B, nh, T, N), rope_t(x_t)
        kwargs: dict[str, Any] = {"detach_kv": c.no_bptt, "need_state": S is not None}
        if cheapest_form(x.shape[2], c.N, c.n_embd, c.chunk_size) == "chunked":
            return chunked(
                q, v, None, S, offset, self.attn.damping, chunk_size=c.chunk_size, **kwargs
            )
        return parallel(q, v, None, S, offset, self.attn.damping, **kwargs)

    def _dropout(self, y: Tensor) -> tuple[Tensor, float]:
        """Dropout of y as (masked y, scale): the 1/(1−p) rescale is left to the caller, which
        applies it to the (B, 1, T, D) product E y instead of to the nh·N-wide y."""
        p = self.drop.p
        if not self.training or p == 0.0:
            return y, 1.0
        if y.device.type != "cpu" or torch.compiler.is_compiling():
            return self.drop(y), 1.0  # fused kernels there; the CPU mask below is eager-only
        return y.mul_(keep_mask(y.shape, p)), 1.0 / (1.0 - p)  # in place: y is fresh

    def _check_ids(self, idx: Tensor) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx must be a (B, T) integer tensor, got {tuple(idx.shape)} {idx.dtype}"
            )
        if idx.numel() == 0:
            raise ValueError("idx is empty: need at least one token")
        if torch.compiler.is_compiling():
            return  # reading the ids' range is a graph break; the trainer checks its data first
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
            )

    # ------------------------------------------------------------------ looking inside
    def run_with_cache(
        self,
        idx: Tensor,
        names: _interpret.Names = None,
        to: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, _interpret.ActivationCache]:
        """`model(idx)` → (logits, cache of the named activation points, `bdh.interpret`).

        `cache["x", 2]` is `cache["layers.2.x"]`; names (a list, or a predicate on names) limit
        what is kept; `to`/`dtype` move and cast it. The logits are exactly `model(idx)`'s.
        """
        return _interpret.run_with_cache(self, idx, names, to, dtype)

    def run_with_hooks(self, idx: Tensor, hooks: list[tuple[str, _trunk.HookFn]]) -> Tensor:
        """`model(idx)` → logits with hooks [(name, fn), ...] for this call only.

        `fn(tensor, name)` observes, or returns a replacement (an ablation, a patch).
        """
        return _interpret.run_with_hooks(self, idx, hooks)

    # ------------------------------------------------------------------ streaming and decoding
    def init_state(self, batch_size: int = 1) -> BDHState:
        """A zero state at position 0 for `batch_size` streams, on the model's device."""
        c = self.config
        return BDHState.zeros(
            c.n_layer,
            batch_size,
            c.n_head,
            c.N,
            c.n_embd,
            device=self.lm_head.device,
            dtype=state_dtype(self.lm_head.dtype),
        )

    def step(self, idx: Tensor, state: BDHState) -> tuple[Tensor, BDHState]:
        """Feed idx (B, t), any t ≥ 1, continuing at state.pos; returns logits (B, t, V).

        The state is advanced in place (like a KV cache) and returned; `state.clone()` branches it.
        Memory is constant in the total length, so any stream can be read piece by piece.
        Without autograd this runs the decoding engine (`bdh.decode`): sparse-active one-token
        steps, chunked prefill; with autograd (training through the state) the trunk above.
        """
        if not _decode.needs_autograd(self):
            return _decode.Decoder(self).step(idx, state), state
        if state.kv is not None or state.ragged:
            raise ValueError(
                "a key-value or ragged state is for decoding only: use torch.no_grad()"
            )
        _decode.check_ids(idx, state, self.config.vocab_size)
        return self._run(idx, state), state

    def decoding_engine(self, options: _decode.DecodeOptions | None = None) -> _decode.Decoder:
        """The decoding engine for this model (KV path, sparse steps, bf16 weights: see options)."""
        return _decode.Decoder(self, options)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        callback: Callable[[Tensor], None] | None = None,
        stop: _generate.Stop | None = None,
        options: _decode.DecodeOptions | None = None,
    ) -> Tensor:
        """Prefill idx (B, T) once, then decode from the state; returns (B, T + max_new_tokens).

        `stop` (an end token id, a string, or a list of them; batch 1) ends generation after the
        first match, which is kept at the end of the output. Prompts of different lengths:
        `bdh.generate.generate_batch`.
        """
        return _generate.generate(
            self,
            idx,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            generator,
            callback,
            stop=stop,
            options=options,
        )


class _Forward:
    """The products of the training and scoring pass (`bdh.trunk`): (B, 1, T, D) and
    (B, nh, T, N) tensors, autograd, dropout, the attention form chosen by its cost."""

    single = False

    def __init__(self, model: BDH, state: BDHState | None, offset: int, T: int) -> None:
        self.model, self.offset = model, offset
        self.rotary = model._rotary(offset, T)  # built once, shared by every layer
        # The states each layer starts from (a recomputed layer reads them again) and ends with.
        self.states: list[Tensor | None] = (
            [None] * model.config.n_layer if state is None else list(state.layers)
        )
        self.new_states: list[Tensor | None] = list(self.states)

    def embed(self, idx: Tensor) -> Tensor:
        return self.model.embed(idx).unsqueeze(1)  # (B, 1, T, D)

    def neurons(self, v: Tensor) -> Tensor:
        # A broadcast product per head: flattening all heads into one (B·T, D) × (D, nh·N)
        # product (and likewise D_y over B·T rows, E over nh·N) measured no faster on CPU.
        return (v @ self.model.encoder).relu_()  # in place: the product is not needed again

    def attend(self, layer: int, x: Tensor, v: Tensor) -> Tensor:
        a, self.new_states[layer] = self.model._attend(
            x, v, self.states[layer], self.offset, self.rotary
        )
        return a

    def scores_y(self, a: Tensor) -> Tensor:
        return a @ self.model.encoder_v  # (B, nh, T, N)

    def decode(self, y: Tensor) -> Tensor:
        """Dropout, then E y as Σ_h y_h E_h (E's rows are head-major): one batched product over
        the heads and a sum of (B, nh, T, D), instead of copying y into a concatenation."""
        nh, N = y.shape[1], y.shape[3]
        y, scale = self.model._dropout(y)
        u = (y @ self.model.decoder.view(nh, N, -1)).sum(1, keepdim=True)  # (B, 1, T, D)
        return u if scale == 1.0 else u * scale

    def y_path(self, x: Tensor, a: Tensor) -> Tensor:
        return self.decode(_trunk.gate(x, self.scores_y(a)))

    def head(self, v: Tensor) -> Tensor:
        return v[:, 0] @ self.model.lm_head  # (B, T, V)


def _strip_compile_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "_orig_mod.")]:
        state_dict[prefix + key[len(prefix) + len("_orig_mod.") :]] = state_dict.pop(key)
