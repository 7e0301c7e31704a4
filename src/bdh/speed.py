"""Opt-in speed-ups of training, each with a fallback that always works.

- `freed_memory_retained()`: within the block, keep freed memory inside the process (glibc). A
  training step allocates and frees the same (B, nh, T, N) activations every step; by default
  glibc hands each large block back to the kernel and the next step page-faults it in again,
  which costs several times the arithmetic of an element-wise pass (measured: a fresh 64 MiB
  tensor costs ~80 ms of page faults on this CPU, filling it ~15 ms). No effect on results. The
  allocator is process-wide: `bdh.train.train` holds it for its loop only; `retain_freed_memory()`
  sets it for the rest of the process (for a script's entry point, like the benchmarks).
- `compile_model(model)`: `torch.compile` where the platform supports it, else eager with a
  one-line warning.
- `autocast(precision, device)`: bf16 autocast for the products; the recurrent state stays
  float32 (see `bdh.ops.common.state_dtype`); "fp32" is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import shutil
import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' defaults (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


def _set_thresholds(mmap: int, trim: int) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1 and ok


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse instead of returning them to the kernel.

    Process-wide and lasting: use it in a program's entry point, or `freed_memory_retained()`
    to scope it. Returns False (and changes nothing) where the C library is not glibc. Peak
    memory is unchanged: the process holds on to at most what it once used.
    """
    # Serve big blocks from the heap (not mmap, which unmaps on free) and never trim the heap.
    return _set_thresholds(1 << 30, 2**31 - 1)


def release_freed_memory() -> bool:
    """Undo `retain_freed_memory`: glibc's default thresholds (128 KiB; glibc's dynamic raising
    of the mmap threshold stays off, as after any mallopt), and the kept memory given back."""
    if not _set_thresholds(_GLIBC_DEFAULT_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD):
        return False
    _glibc().malloc_trim(0)
    return True


@contextlib.contextmanager
def freed_memory_retained() -> Iterator[bool]:
    """Keep freed memory in the process within the block (yields whether it could), then
    release it (`release_freed_memory`)."""
    retained = retain_freed_memory()
    try:
        yield retained
    finally:
        if retained:
            release_freed_memory()


def compile_supported(device: str = "cpu") -> tuple[bool, str]:
    """Whether torch.compile can build kernels here, and why not."""
    if sys.platform == "win32":
        return False, "torch.compile is not supported on Windows"
    if device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False, "no C++ compiler on PATH (torch.compile needs one for CPU kernels)"
    return True, ""


def compile_model(model: nn.Module, device: str = "cpu") -> nn.Module:
    """`model.compile()` in place (state-dict keys unchanged) or, if unsupported, eager."""
    ok, why = compile_supported(device)
    if not ok:
        warnings.warn(f"--compile ignored: {why}; running eager", stacklevel=2)
        return model
    model.compile()
    return model


def bf16_supported(device: str = "cpu") -> tuple[bool, str]:
    """bf16 autocast runs everywhere on CPU but is only fast with native bf16 instructions."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "" if ok else "this GPU has no bf16"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN for bf16 products"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    native = native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return True, "" if native else "no native bf16 instructions on this CPU: products will be slow"


@contextlib.contextmanager
def autocast(precision: str = "fp32", device: str = "cpu") -> Iterator[None]:
    """Run the block under bf16 autocast ("bf16") or as is ("fp32")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        yield
        return
    ok, why = bf16_supported(device)
    if why:
        warnings.warn(f"--precision bf16: {why}", stacklevel=3)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=ok):
        yield
