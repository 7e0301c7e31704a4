"""Optional fused CPU kernels for the sparse-active decoding step (compiled on first use).

Notation: G = B·nh groups, N neurons per head, n = nh·N, D = n_embd.

The torch version of the sparse step (`bdh.ops.sparse`) gathers the active rows into temporaries,
multiplies, and scatters them back: five passes over the active rows plus a fresh allocation per
call. These kernels make one pass: each active row of S is read once and written once, each active
row of D_y and E is read once, nothing is allocated per row. They compute the same sums (in a
different order) and are tested against the torch versions.

Built with torch.utils.cpp_extension (needs a C++ compiler; ~30 s the first time, then cached
in the torch extensions directory). `available()` says whether they can be used: False without a
compiler, an error with the compiler's message when a present compiler fails to build them. Nothing
falls back silently: the engine uses them only when asked (`DecodeOptions(kernels="cpp")`).
"""

from __future__ import annotations

import functools
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <cstring>

namespace {

inline float to_float(float x) { return x; }
// bfloat16 is the top half of a float32: a shift the compiler vectorises (c10's conversion is not).
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline const uint16_t* bf16_bits(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>());
}

// Active rows are scattered, so the hardware prefetcher cannot guess the next one: each kernel
// first lists its rows, then asks for the row PF positions ahead while working on this one.
constexpr int64_t PF = 6;

template <typename T>
inline void prefetch_row(const T* p, int64_t D, int write) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(T)); o += 64) {
    if (write) __builtin_prefetch(c + o, 1, 3); else __builtin_prefetch(c + o, 0, 3);
  }
}

// out[g] = Σ_i k[g,i]·S[g,i,:] over rows with k ≠ 0, then S[g,i,:] += k[g,i]·v[g,:] on those rows.
void state_step_rows(const float* k, const float* v, float* S, float* out,
                     int64_t g0, int64_t g1, int64_t N, int64_t D) {
  std::vector<int64_t> rows;
  rows.reserve(N);
  for (int64_t g = g0; g < g1; ++g) {
    const float* kg = k + g * N;
    const float* __restrict__ vg = v + g * D;
    float* __restrict__ og = out + g * D;
    rows.clear();
    for (int64_t i = 0; i < N; ++i) if (kg[i] != 0.0f) rows.push_back(i);
    const int64_t M = static_cast<int64_t>(rows.size());
    for (int64_t j = 0; j < M; ++j) {
      if (j + PF < M) prefetch_row(S + (g * N + rows[j + PF]) * D, D, 1);
      const float ki = kg[rows[j]];
      float* __restrict__ s = S + (g * N + rows[j]) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float sd = s[d];
        og[d] += ki * sd;          // read before write: the token does not see itself
        s[d] = sd + ki * vg[d];
      }
    }
  }
}

struct Fired { int64_t i, b; float y; };

// Phase 1: ys = a·D_y[i] for neurons active in x; phase 2: u += y·E[i] where y > 0.
template <typename W>
int64_t y_rows(const float* x, const float* a, const W* dy, const W* E, float* u,
               int64_t i0, int64_t i1, int64_t B, int64_t n, int64_t N, int64_t nh, int64_t D) {
  std::vector<int64_t> cand;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t b = 0; b < B; ++b)
      if (x[b * n + i] > 0.0f) { cand.push_back(i); break; }
  std::vector<Fired> fired;
  const int64_t C = static_cast<int64_t>(cand.size());
  for (int64_t j = 0; j < C; ++j) {
    if (j + PF < C) prefetch_row(dy + cand[j + PF] * D, D, 0);
    const int64_t i = cand[j], h = i / N;
    const W* __restrict__ dyi = dy + i * D;
    for (int64_t b = 0; b < B; ++b) {
      const float xi = x[b * n + i];
      if (xi <= 0.0f) continue;
      const float* __restrict__ ab = a + (b * nh + h) * D;
      float ys = 0.0f;
      for (int64_t d = 0; d < D; ++d) ys += ab[d] * to_float(dyi[d]);
      if (ys > 0.0f) fired.push_back({i, b, xi * ys});
    }
  }
  const int64_t F = static_cast<int64_t>(fired.size());
  for (int64_t j = 0; j < F; ++j) {
    if (j + PF < F) prefetch_row(E + fired[j + PF].i * D, D, 0);
    const W* __restrict__ ei = E + fired[j].i * D;
    float* __restrict__ ub = u + fired[j].b * D;
    const float y = fired[j].y;
    for (int64_t d = 0; d < D; ++d) ub[d] += y * to_float(ei[d]);
  }
  return F;
}

// x[b, c0:c1] = relu(Σ_d v[b,d]·W[d, c0:c1]) for one head: W streamed row by row, contiguous.
template <typename W>
void encode_block(const float* v, const W* w, float* x, int64_t B, int64_t D, int64_t N,
                  int64_t c0, int64_t c1, int64_t x_stride) {
  const int64_t width = c1 - c0;
  std::vector<float> acc(B * width, 0.0f);
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {  // four rows per pass: the accumulators are loaded/stored 4x less
    const W* __restrict__ r0 = w + d * N + c0;
    const W* __restrict__ r1 = r0 + N;
    const W* __restrict__ r2 = r1 + N;
    const W* __restrict__ r3 = r2 + N;
    for (int64_t b = 0; b < B; ++b) {
      const float* vb = v + b * D + d;
      float* __restrict__ ab = acc.data() + b * width;
      for (int64_t j = 0; j < width; ++j)
        ab[j] += vb[0] * to_float(r0[j]) + vb[1] * to_float(r1[j]) + vb[2] * to_float(r2[j]) +
                 vb[3] * to_float(r3[j]);
    }
  }
  for (; d < D; ++d) {
    const W* __restrict__ row = w + d * N + c0;
    for (int64_t b = 0; b < B; ++b) {
      const float vb = v[b * D + d];
      float* __restrict__ ab = acc.data() + b * width;
      for (int64_t j = 0; j < width; ++j) ab[j] += vb * to_float(row[j]);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < width; ++j) {
      const float a = acc[b * width + j];
      x[b * x_stride + c0 + j] = a > 0.0f ? a : 0.0f;
    }
}

}  // namespace

torch::Tensor encode(torch::Tensor v, torch::Tensor W) {
  // v (B, D) float, W (nh, D, N) float or bfloat16 → x = relu(v W) (B, nh, N) float
  TORCH_CHECK(v.dtype() == torch::kFloat && v.is_contiguous() && W.is_contiguous());
  const int64_t B = v.size(0), nh = W.size(0), D = W.size(1), N = W.size(2);
  auto x = torch::empty({B, nh, N}, v.options());
  const int64_t block = std::min<int64_t>(N, 4096);     // accumulators stay in L1/L2
  const int64_t per_head = (N + block - 1) / block;
  const float* vp = v.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, nh * per_head, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / per_head, c0 = (t % per_head) * block;
      const int64_t c1 = std::min(N, c0 + block);
      float* xh = xp + h * N;
      if (W.dtype() == torch::kBFloat16) {
        encode_block(vp, bf16_bits(W) + h * D * N, xh, B, D, N, c0, c1, nh * N);
      } else {
        encode_block(vp, W.data_ptr<float>() + h * D * N, xh, B, D, N, c0, c1, nh * N);
      }
    }
  });
  return x;
}

torch::Tensor state_step(torch::Tensor k, torch::Tensor v, torch::Tensor S) {
  TORCH_CHECK(k.dtype() == torch::kFloat && v.dtype() == torch::kFloat);
  TORCH_CHECK(S.dtype() == torch::kFloat);
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && S.is_contiguous());
  const int64_t G = S.size(0), N = S.size(1), D = S.size(2);
  auto out = torch::zeros({G, D}, k.options());
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* Sp = S.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    state_step_rows(kp, vp, Sp, op, g0, g1, N, D);
  });
  return out;
}

std::tuple<torch::Tensor, int64_t> y_path(torch::Tensor x, torch::Tensor a, torch::Tensor dy,
                                          torch::Tensor E) {
  // x (B, n) ≥ 0, a (B, nh, D) float; dy, E (n, D) float or bfloat16
  // → u (B, D) float and the number of (stream, neuron) pairs where y > 0
  TORCH_CHECK(x.is_contiguous() && a.is_contiguous() && dy.is_contiguous() && E.is_contiguous());
  TORCH_CHECK(dy.dtype() == E.dtype());
  const int64_t B = x.size(0), n = x.size(1), nh = a.size(1), D = a.size(2), N = n / nh;
  const int nthreads = at::get_num_threads();
  auto partial = torch::zeros({nthreads, B, D}, a.options());
  std::vector<int64_t> fired(nthreads, 0);
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(N / 4, 64);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    const int t = at::get_thread_num();
    float* u = pp + t * B * D;   // one accumulator per thread: no races
    if (dy.dtype() == torch::kBFloat16) {
      fired[t] += y_rows(xp, ap, bf16_bits(dy), bf16_bits(E), u, i0, i1, B, n, N, nh, D);
    } else {
      fired[t] += y_rows(xp, ap, dy.data_ptr<float>(), E.data_ptr<float>(), u,
                         i0, i1, B, n, N, nh, D);
    }
  });
  int64_t total = 0;
  for (auto f : fired) total += f;
  return {partial.sum(0), total};
}
"""


# Let the compiler vectorise the dot products (reassociation) without -ffast-math's NaN/inf
# assumptions, so a NaN in the state still shows up in the logits.
_REASSOCIATE = ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


@functools.cache
def _module() -> Any:
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        name="bdh_sparse_decode",
        cpp_sources=_SOURCE,
        functions=["encode", "state_step", "y_path"],
        extra_cflags=["-O3", "-march=native", "-fopenmp", *_REASSOCIATE],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def missing_toolchain() -> str | None:
    """Why the kernels cannot be built here (no C++ compiler or no Python headers), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    if not headers.is_file():
        return f"no Python headers ({headers})"
    return None


@functools.cache
def available() -> bool:
    """True when the kernels compile and load here (the first call may take a minute).

    False only where the toolchain is missing (`missing_toolchain`). With a toolchain present, a
    build that fails is a defect of the kernels, not an absence: it raises, with the compiler's
    message, instead of quietly falling back.
    """
    if missing_toolchain() is not None:
        return False
    _module()
    return True


def load() -> Any:
    """The compiled module; raises with the compiler's message when it cannot be built."""
    return _module()


def encode(v: Tensor, encoder: Tensor) -> Tensor:
    """x = relu(v D_x): v (B, D) float32, encoder (nh, D, N) float32 or bf16 → (B, nh, N).

    One streaming pass over the weights (the bulk of a sparse step's bytes), relu fused.
    """
    return load().encode(v.float().contiguous(), encoder)


def state_step(k: Tensor, v: Tensor, S: Tensor) -> Tensor:
    """Fused sparse read-then-write of S: k (G, N), v (G, D), S (G, N, D) float32 → (G, D)."""
    return load().state_step(k.contiguous(), v.contiguous(), S)


def y_path(x: Tensor, a: Tensor, encoder_v_rows: Tensor, decoder: Tensor) -> tuple[Tensor, float]:
    """u = (x ⊙ relu(a D_y)) E over active neurons: x (B, nh, N), a (B, nh, D) → (B, D), density.

    The density is that of y over streams and neurons (the torch path reports the union over
    streams; the two agree for B = 1).
    """
    B, nh, N = x.shape
    x_flat = x.reshape(B, nh * N).float().contiguous()
    u, fired = load().y_path(x_flat, a.float().contiguous(), encoder_v_rows, decoder)
    return u, fired / (B * nh * N)


def usable(*tensors: Tensor) -> bool:
    """The kernels take contiguous float32 activations on the CPU."""
    return all(t.device.type == "cpu" for t in tensors)
