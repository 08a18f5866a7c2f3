// Shared pieces of the vocabulary-tiled CPU ops (linear_logprobs.cpp, linear_kl.cpp).
//
// Layout of every op: rows of `hidden` are processed in blocks of kRowBlock, the vocabulary in
// tiles of kVocabTile. One fp32 logits tile [rows, vocab_tile] lives at a time (never [N, V]);
// it is filled by ATen's BLAS GEMM (multi-threaded, blocked for the cache) and then consumed by
// a fused per-row pass (online logsumexp statistics in the forward, the logit gradient in the
// backward) while it is still in cache. The row passes run on OpenMP threads via
// at::parallel_for; the GEMMs use the BLAS thread pool. Loops over (row block, vocab tile) are
// serial, so every output element is accumulated by one sequence of GEMM calls in a fixed order:
// no atomics and bit-identical reruns on a given machine.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace engine_ops {

// 512 x 1024 fp32 = 2 MiB per tile: large enough for an efficient GEMM and few parallel regions
// (each costs a barrier, which hurts on busy machines), small enough to stay in
// L2/L3 between the GEMM that writes it and the row pass that reads it.
constexpr int64_t kRowBlock = 512;
constexpr int64_t kVocabTile = 1024;
constexpr int64_t kIgnoreIndex = -100;

// The row passes are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time:
// the extension stays portable across machines (no -march=native in the cached .so) yet uses
// wide vectors where present. Each machine always takes the same clone, so reruns are
// bit-identical; two different machines may differ in the last bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENGINE_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGINE_VEC_CLONES
#endif

// exp(x) for the softmax passes, written with plain arithmetic so that `#pragma omp simd` loops
// vectorize without -ffast-math (libm's expf is a scalar call). Cephes-style: x = n ln2 + r,
// |r| <= ln2/2, degree-6 polynomial for e^r, 2^n by exponent bits. Max relative error ~2 ulp.
// Inputs below -87 flush to exp(-87) ~ 1.6e-38 (the softmax only feeds it z - max <= 0, where
// that is 0 for every practical purpose); inputs above 88 saturate at exp(88).
static inline __attribute__((always_inline)) float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln2) with the 1.5 * 2^23 shifter (exact for |x / ln2| < 2^22; ISO C++ mode keeps
  // the compiler from folding the add/sub pair).
  const float shifter = 12582912.0f;
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;          // ln2 split in two for an exact first product
  r = r - n * -2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Running softmax statistics of one row, merged tile by tile. With m the running max,
//   s = sum_v e^(z_v - m),  u = sum_v e^(z_v - m) (z_v - m)  (logprobs: entropy)
// or u = sum_v e^(z_v - m) (z_v - zr_v)                    (KL: E_p[z - zr] = u / s).
// Tile partial sums are fp32 over <= kVocabTile terms; the running sums are fp64 so that the
// error does not grow with V.
struct RowStats {
  float m = -std::numeric_limits<float>::infinity();
  double s = 0.0;
  double u = 0.0;
};

// Merge a tile's partials (computed relative to the new max m_new) into the running stats.
// shift_u: u is relative to m (entropy form) and must be shifted by (m_old - m_new) * s_old;
// for the KL form u does not depend on m and is only rescaled.
static inline void merge(RowStats& st, float m_new, double s_tile, double u_tile, bool shift_u) {
  if (st.s > 0.0) {
    const double dm = static_cast<double>(st.m) - static_cast<double>(m_new);  // <= 0
    const double a = std::exp(dm);
    st.u = a * (st.u + (shift_u ? dm * st.s : 0.0)) + u_tile;
    st.s = a * st.s + s_tile;
  } else {
    st.u = u_tile;
    st.s = s_tile;
  }
  st.m = m_new;
}

// Contiguous [rows, cols] fp32 view on the front of a flat scratch buffer, so that partial
// tiles stay dense (the row passes assume a row stride of `cols`).
static inline at::Tensor tile_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace engine_ops
