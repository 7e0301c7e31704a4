"""The decoding state of BDH-GPU: per layer and head, the Hebbian state S (ρ transposed).

Its size is constant in the context length: L · B · nh · N · D floats, kept in float32.

Two extensions for decoding (see `bdh.decode`):
- below the crossover context the same information can be held as a key-value cache (`kv`), which
  is smaller and cheaper there; `materialise()` folds it into S;
- streams of a batch may sit at different positions (`row_pos`), e.g. prompts of different lengths
  prefilled one by one and then decoded together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bdh.ops.kv import KVCache


@dataclass
class BDHState:
    """S for every layer, (B, nh, N, D) each, and the absolute position of the next token.

    `row_pos` (B,) is set when the streams are at different positions; `pos` is then the largest.
    `kv` holds the context as keys and values instead (then `layers` is empty) until it is folded
    into S; `damping` (nh,) is kept with it because folding needs λ.
    """

    layers: list[Tensor] = field(default_factory=list)
    pos: int = 0
    row_pos: Tensor | None = None
    kv: KVCache | None = None
    damping: Tensor | None = None

    @classmethod
    def zeros(
        cls,
        n_layer: int,
        batch_size: int,
        n_head: int,
        N: int,
        D: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BDHState:
        shape = (batch_size, n_head, N, D)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)], 0)

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size if self.kv is not None else self.layers[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (for S, independent of how many tokens were read)."""
        kv = 0 if self.kv is None else self.kv.nbytes
        return kv + sum(S.numel() * S.element_size() for S in self.layers)

    @property
    def ragged(self) -> bool:
        return self.row_pos is not None

    def positions(self) -> Tensor:
        """The position of the next token of every stream: (B,) int64."""
        if self.row_pos is not None:
            return self.row_pos
        return torch.full((self.batch_size,), self.pos, dtype=torch.int64)

    def _replace(
        self, layers: list[Tensor], kv: KVCache | None, row_pos: Tensor | None
    ) -> BDHState:
        return BDHState(layers, self.pos, row_pos, kv, self.damping)

    def clone(self) -> BDHState:
        """An independent copy, e.g. to branch two continuations from one prefix."""
        row_pos = None if self.row_pos is None else self.row_pos.clone()
        kv = None if self.kv is None else self.kv.clone()
        return self._replace([S.clone() for S in self.layers], kv, row_pos)

    def detach(self) -> BDHState:
        """The same values cut from the autograd graph (truncated BPTT at batch boundaries)."""
        return self._replace([S.detach() for S in self.layers], self.kv, self.row_pos)

    def to(self, device: torch.device | str) -> BDHState:
        kv = None if self.kv is None else self.kv.to(device)
        return self._replace([S.to(device) for S in self.layers], kv, self.row_pos)

    def materialise(self) -> BDHState:
        """Fold a key-value cache into S, in place (no-op for a state already in S form)."""
        if self.kv is not None:
            self.layers = self.kv.to_state(self.damping)
            self.kv = None
        return self

    def select(self, rows: Tensor | list[int]) -> BDHState:
        """A state with only the streams `rows`, e.g. to drop streams that finished."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        kv = None if self.kv is None else self.kv.select(rows)
        layers = [S.index_select(0, rows.to(S.device)) for S in self.layers]
        picked = _uniform(self.positions().index_select(0, rows))
        out = BDHState(layers, 0, None, kv, self.damping)
        out.pos, out.row_pos = picked
        return out

    @classmethod
    def stack(cls, states: list[BDHState]) -> BDHState:
        """One batched state from several (e.g. prompts of different lengths prefilled one by one).

        Key-value caches are folded into S first, since the streams may sit at different positions.
        """
        if not states:
            raise ValueError("stack needs at least one state")
        states = [s.clone().materialise() if s.kv is not None else s for s in states]
        layers = [
            torch.cat(group, dim=0) for group in zip(*(s.layers for s in states), strict=True)
        ]
        out = BDHState(layers, 0, None, None, states[0].damping)
        out.pos, out.row_pos = _uniform(torch.cat([s.positions() for s in states]))
        return out

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (positions in its metadata; a cache is folded)."""
        layers = self.kv.to_state(self.damping) if self.kv is not None else self.layers
        tensors = {f"layer.{i}": S.detach().contiguous() for i, S in enumerate(layers)}
        meta: dict = {"pos": self.pos}
        if self.row_pos is not None:
            meta["row_pos"] = self.row_pos.tolist()
        save_file(tensors, str(path), metadata={"bdh_state": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> BDHState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("bdh_state", "{}"))
        tensors = load_file(str(path), device=str(device))
        layers = [tensors[f"layer.{i}"] for i in range(len(tensors))]
        row_pos = meta.get("row_pos")
        row_pos = None if row_pos is None else torch.tensor(row_pos, dtype=torch.int64)
        return cls(layers, int(meta.get("pos", 0)), row_pos)


def _uniform(positions: Tensor) -> tuple[int, Tensor | None]:
    """(pos, row_pos): row_pos only when the streams are at different positions."""
    if bool((positions == positions[0]).all()):
        return int(positions[0]), None
    return int(positions.max()), positions.clone()
