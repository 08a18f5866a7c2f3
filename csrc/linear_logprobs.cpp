// engine_ops::linear_logprobs_fwd / _bwd: fused linear -> log-softmax -> gather (+ entropy) on
// CPU without the [N, V] logits (see vocab_tile.h for the tiling and determinism scheme).
//
//   z = (hidden @ weight.T) / T,  lse = logsumexp_v z,  logp = z[t] - lse,
//   H = lse - sum_v p_v z_v = -sum_v p_v log p_v,  p = softmax(z)
//   rows with t == -100: logp = H = 0 and zero gradient.
// Backward with upstream g (logp) and g_H (entropy):
//   dz_v = g (1[v == t] - p_v) - g_H p_v (log p_v + H);  dx = dz / T
//   d hidden = dx @ weight,  d weight = dx.T @ hidden.
// Caution: fp32 only (the Python wrapper converts); the backward recomputes each logits tile
// once (3 GEMMs of N*V*d in the backward, as eager autograd does).
#include <torch/library.h>

#include "vocab_tile.h"

namespace engine_ops {
namespace {

// Forward statistics of one row over one vocab tile.
// z: [n] raw logits x = h . w (scaled here by inv_t), tgt: target index relative to the tile
// (outside [0, n) if the target is elsewhere), *zt receives the scaled target logit.
ENGINE_VEC_CLONES
void row_fwd(const float* z, int64_t n, float inv_t, int64_t tgt, RowStats* st, float* zt) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < n; ++v) mx = std::max(mx, z[v] * inv_t);
  const float m_new = std::max(st->m, mx);
  float s = 0.f, u = 0.f;
#pragma omp simd reduction(+ : s, u)
  for (int64_t v = 0; v < n; ++v) {
    const float d = z[v] * inv_t - m_new;
    const float e = fast_exp(d);
    s += e;
    u += e * d;
  }
  if (tgt >= 0 && tgt < n) *zt = z[tgt] * inv_t;
  merge(*st, m_new, s, u, /*shift_u=*/true);
}

// Backward of one row over one tile, in place: z holds raw logits on entry, dx on exit.
ENGINE_VEC_CLONES
void row_bwd(float* z, int64_t n, float inv_t, int64_t tgt, float lse, float ent, float g,
             float g_h) {
  const float gi = g * inv_t, ghi = g_h * inv_t;
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    const float lp = z[v] * inv_t - lse;
    const float p = fast_exp(lp);
    z[v] = -p * (gi + ghi * (lp + ent));
  }
  if (tgt >= 0 && tgt < n) z[tgt] += gi;
}

void check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "engine_ops linear ops: CPU tensors expected");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [N, d] and weight [V, d] expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "engine_ops linear ops take fp32 hidden/weight, got ", hidden.scalar_type(), "/",
              weight.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == hidden.size(0),
              "targets must be int64 [N] with N = ", hidden.size(0));
}

// Returns (logp [N], entropy [N], lse [N]); lse is saved for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden_, const at::Tensor& weight_, const at::Tensor& targets_,
    double temperature) {
  check_args(hidden_, weight_, targets_);
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor logp = at::zeros({N}, hidden.options());
  at::Tensor ent = at::zeros({N}, hidden.options());
  at::Tensor lse = at::zeros({N}, hidden.options());
  if (N == 0) return {logp, ent, lse};
  TORCH_CHECK(V > 0, "weight has an empty vocabulary");
  const int64_t* tg = targets.data_ptr<int64_t>();
  float* lp_out = logp.data_ptr<float>();
  float* ent_out = ent.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const int64_t RB = std::min(kRowBlock, N), VT = std::min(kVocabTile, V);
  at::Tensor buf = at::empty({RB * VT}, hidden.options());
  std::vector<RowStats> stats(RB);
  std::vector<float> zt(RB);
  for (int64_t r0 = 0; r0 < N; r0 += RB) {
    const int64_t rb = std::min(RB, N - r0);
    const at::Tensor h_blk = hidden.narrow(0, r0, rb);
    std::fill(stats.begin(), stats.end(), RowStats{});
    std::fill(zt.begin(), zt.end(), 0.f);
    for (int64_t v0 = 0; v0 < V; v0 += VT) {
      const int64_t vt = std::min(VT, V - v0);
      at::Tensor tile = tile_view(buf, rb, vt);
      at::mm_out(tile, h_blk, weight.narrow(0, v0, vt).t());
      const float* tp = tile.data_ptr<float>();
      at::parallel_for(0, rb, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          row_fwd(tp + i * vt, vt, inv_t, tg[r0 + i] - v0, &stats[i], &zt[i]);
      });
    }
    for (int64_t i = 0; i < rb; ++i) {
      const RowStats& st = stats[i];
      const double log_s = std::log(st.s);
      const double l = static_cast<double>(st.m) + log_s;
      lse_out[r0 + i] = static_cast<float>(l);
      if (tg[r0 + i] == kIgnoreIndex) continue;
      TORCH_CHECK(tg[r0 + i] >= 0 && tg[r0 + i] < V, "target ", tg[r0 + i], " at row ", r0 + i,
                  " is outside [0, ", V, ") and is not -100");
      lp_out[r0 + i] = static_cast<float>(static_cast<double>(zt[i]) - l);
      ent_out[r0 + i] = static_cast<float>(log_s - st.u / st.s);
    }
  }
  return {logp, ent, lse};
}

// Returns (grad_hidden [N, d], grad_weight [V, d]) fp32. grad_entropy may be an empty tensor
// (no gradient reached the entropy output).
std::tuple<at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& grad_logp_, const at::Tensor& grad_ent_, const at::Tensor& hidden_,
    const at::Tensor& weight_, const at::Tensor& targets_, const at::Tensor& lse_,
    const at::Tensor& ent_, double temperature) {
  check_args(hidden_, weight_, targets_);
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool has_ent = grad_ent_.numel() > 0;
  const at::Tensor g_lp = grad_logp_.to(at::kFloat).contiguous();
  const at::Tensor g_en = has_ent ? grad_ent_.to(at::kFloat).contiguous() : g_lp;
  const at::Tensor lse = lse_.contiguous(), ent = ent_.contiguous();
  TORCH_CHECK(g_lp.numel() == N && g_en.numel() == N && lse.numel() == N && ent.numel() == N,
              "linear_logprobs_bwd: per-row tensors must have N = ", N, " elements");
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor dh = at::zeros_like(hidden);
  at::Tensor dw = at::zeros_like(weight);
  if (N == 0 || V == 0) return {dh, dw};
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float* glp = g_lp.data_ptr<float>();
  const float* gen = g_en.data_ptr<float>();
  const float* lsep = lse.data_ptr<float>();
  const float* entp = ent.data_ptr<float>();
  const int64_t RB = std::min(kRowBlock, N), VT = std::min(kVocabTile, V);
  at::Tensor buf = at::empty({RB * VT}, hidden.options());
  for (int64_t r0 = 0; r0 < N; r0 += RB) {
    const int64_t rb = std::min(RB, N - r0);
    const at::Tensor h_blk = hidden.narrow(0, r0, rb);
    at::Tensor dh_blk = dh.narrow(0, r0, rb);
    for (int64_t v0 = 0; v0 < V; v0 += VT) {
      const int64_t vt = std::min(VT, V - v0);
      const at::Tensor w_tile = weight.narrow(0, v0, vt);
      at::Tensor tile = tile_view(buf, rb, vt);
      at::mm_out(tile, h_blk, w_tile.t());
      float* tp = tile.data_ptr<float>();
      at::parallel_for(0, rb, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t row = r0 + i;
          if (tg[row] == kIgnoreIndex) {  // no gradient through ignored rows
            std::fill(tp + i * vt, tp + (i + 1) * vt, 0.f);
            continue;
          }
          row_bwd(tp + i * vt, vt, inv_t, tg[row] - v0, lsep[row], entp[row], glp[row],
                  has_ent ? gen[row] : 0.f);
        }
      });
      // each (row block, vocab tile) pair adds into its own dh rows and dw rows once, in a
      // fixed order: deterministic without atomics.
      dh_blk.addmm_(tile, w_tile);
      dw.narrow(0, v0, vt).addmm_(tile.t(), h_blk);
    }
  }
  return {dh, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine_ops, CPU, m) {
  m.impl("linear_logprobs_fwd", &linear_logprobs_fwd);
  m.impl("linear_logprobs_bwd", &linear_logprobs_bwd);
}

}  // namespace engine_ops
