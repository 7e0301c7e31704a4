"""How one training micro-batch runs: data-parallel processes and the carried state (App. B).

    torchrun --nproc_per_node 2 -m bdh.cli train --batch-size 32 ...    # 2 processes, 16 rows each

Multi-process training (`torch.distributed`, gloo on CPU, NCCL on GPU) is started by `torchrun`,
which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Every process builds the same model (same
seed), draws the same global batch from the same sampler and keeps only its rows, so the global
batch is the configured one whatever the number of processes, and a checkpoint written by one
world size resumes under any other. `DistributedDataParallel` averages the gradients, which equals
the single-process gradient of the global mean loss. Only rank 0 logs, evaluates and writes
checkpoints; the ranks agree on when to stop (time budget, Ctrl-C) at every step.

With `carry_state` (paper App. B, "truncated BPTT"), batches are temporally coherent streams and
the model reads each batch starting from the state S that the previous batch left: gradients flow
within a batch only (the state is detached at batch boundaries), and the state restarts from zero
when the streams wrap around to their beginnings. The carried state is saved with checkpoints.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bdh.config import ConfigError
from bdh.speed import PRECISIONS, autocast, compile_model
from bdh.state import BDHState


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def world() -> World:
    """The process group torchrun asked for (initialised once), or a world of one."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        _WORLD = World()
        return _WORLD
    if not dist.is_initialized():
        backend = os.environ.get("BDH_DIST_BACKEND") or (
            "nccl" if torch.cuda.is_available() and os.environ.get("LOCAL_RANK") else "gloo"
        )
        dist.init_process_group(backend)  # env:// rendezvous, as torchrun sets it up
        atexit.register(_shutdown)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return _WORLD


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def validate_options(cfg: Any) -> None:
    """One-line errors for training options that do not fit together (called by TrainConfig)."""
    if cfg.precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}"
        )
    for name in ("carry_state", "recompute", "compile"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.carry_state and cfg.batches != "stream":
        raise ConfigError("carry_state needs temporally coherent batches: use --batches stream")
    if (cfg.carry_state or cfg.recompute) and cfg.model != "bdh":
        raise ConfigError("carry_state and recompute are options of --model bdh")
    resolve_device(cfg.device)  # an unknown or unavailable device fails before any work
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be divisible by the {size} training processes"
        )


def resolve_device(name: str) -> torch.device:
    """The torch device of a `device` setting: "cpu", "cuda", "cuda:K" or "auto" (a GPU when
    there is one). Under torchrun every process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"device must be cpu, cuda, cuda:K or auto, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but torch sees no CUDA GPU here; use cpu")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


class Stepper:
    """The compute of one micro-batch for the trainer: this rank's rows, the (DDP-wrapped)
    forward under the chosen precision, the carried state, and the cross-rank reductions."""

    def __init__(self, model: nn.Module, cfg: Any) -> None:
        self.world = world()
        self.device = resolve_device(cfg.device)
        # In place (the parameters stay the same objects), so an optimizer built on the model
        # before keeps working; checkpoints are written from, and loaded to, the CPU.
        model.to(self.device)
        self.model, self.cfg = model, cfg
        if cfg.recompute:
            model.recompute = True
        if cfg.compile:
            compile_model(model, self.device.type)
        self.net = model  # what the micro-batch calls: the model, or its DDP wrapper
        if self.world.size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            torch.manual_seed(cfg.seed + self.world.rank)  # dropout masks differ across ranks
        self.state: BDHState | None = None  # carried across batches (this rank's rows)

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    # ------------------------------------------------------------------ one micro-batch
    def next_batch(self, sampler: Any) -> tuple[Tensor, Tensor]:
        """The next global batch's rows of this rank; a carried state restarts at lane starts."""
        if self.cfg.carry_state and getattr(sampler, "fresh", False):
            self.state = None
        x, y = sampler.next()
        rows = x.shape[0] // self.world.size
        start = self.world.rank * rows
        return self._here(x[start : start + rows]), self._here(y[start : start + rows])

    def _here(self, t: Tensor) -> Tensor:
        """t on this rank's device (a no-op on the CPU)."""
        return t.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Gradients are averaged across ranks once per optimizer step, on the last micro-batch."""
        if last or self.world.size == 1:
            yield
        else:
            with self.net.no_sync():  # type: ignore[operator]
                yield

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean next-token loss of this rank's rows (reading the carried state if any)."""
        with autocast(self.cfg.precision, self.device.type):
            if not self.cfg.carry_state:
                return self.net(x, y)[1]
            if self.state is None:
                self.state = self.model.init_state(x.shape[0])
            logits, _ = self.net(x, state=self.state)  # advances self.state in place
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def after_backward(self) -> None:
        """Truncated BPTT: the next batch reads the state's values but sends no gradient back."""
        if self.state is not None:
            self.state = self.state.detach()

    # ------------------------------------------------------------------ agreement across ranks
    def all_finite(self, loss: Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        return bool(self._reduce(finite, dist.ReduceOp.MIN))

    def mean(self, value: float) -> float:
        return float(self._reduce(self._scalar(value))) / self.world.size

    def agree_seconds(self, seconds: float) -> float:
        """The slowest rank's step time, so every rank reads the same time budget."""
        return float(self._reduce(self._scalar(seconds), dist.ReduceOp.MAX))

    def agree_stop(self, stop: bool) -> bool:
        """Stop (Ctrl-C) as soon as any rank was asked to."""
        return bool(self._reduce(self._scalar(float(stop)), dist.ReduceOp.MAX))

    def _scalar(self, value: float) -> Tensor:
        # On the rank's device: NCCL reduces GPU tensors only.
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()

    def _reduce(self, t: Tensor, op: Any = None) -> Tensor:
        if self.world.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Collective: the carried state of all rows and the other ranks' torch RNG states."""
        out: dict[str, Any] = {}
        if self.world.size > 1:
            out["rng_by_rank"] = self._gather_list(torch.get_rng_state())
        if self.device.type == "cuda":  # dropout masks drawn on the GPU resume exactly too
            out["cuda_rng_by_rank"] = self._gather_list(torch.cuda.get_rng_state(self.device))
        if self.state is not None:
            layers = [self._gather_rows(S.detach().contiguous()) for S in self.state.layers]
            out["carried"] = {"layers": layers, "pos": self.state.pos}
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """This rank's rows of a saved carried state, and its RNG if the same rank saved one."""
        rng = saved.get("rng_by_rank", [])
        if 0 < self.world.rank < len(rng):
            torch.set_rng_state(rng[self.world.rank])
        cuda_rng = saved.get("cuda_rng_by_rank", [])
        if self.device.type == "cuda" and self.world.rank < len(cuda_rng):
            torch.cuda.set_rng_state(cuda_rng[self.world.rank], self.device)
        carried = saved.get("carried")
        if carried is not None and self.cfg.carry_state:
            rows = carried["layers"][0].shape[0] // self.world.size
            start = self.world.rank * rows
            layers = [self._here(S[start : start + rows].clone()) for S in carried["layers"]]
            self.state = BDHState(layers, int(carried["pos"]))

    def _gather_rows(self, t: Tensor) -> Tensor:
        return torch.cat(self._gather_list(t))

    def _gather_list(self, t: Tensor) -> list[Tensor]:
        """t of every rank, in rank order, on the CPU (for checkpoints)."""
        if self.world.size == 1:
            return [t.cpu()]
        t = self._here(t)  # NCCL gathers GPU tensors only
        parts = [torch.empty_like(t) for _ in range(self.world.size)]
        dist.all_gather(parts, t)
        return [p.cpu() for p in parts]


class NullLog:
    """The metrics log of the ranks that do not write one."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
