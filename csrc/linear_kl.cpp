// engine_ops::linear_kl_fwd / _bwd: policy and reference target log-probs plus the exact
// per-token KL(p || q) over the vocabulary, on CPU without [N, V] buffers (see vocab_tile.h).
//
//   z = (hidden @ weight.T) / T,  zr = (ref_hidden @ ref_weight.T) / T,  p = softmax(z),
//   q = softmax(zr),  logp = z[t] - lse(z),  ref_logp = zr[t] - lse(zr),
//   kl = sum_v p_v (log p_v - log q_v) = E_p[z - zr] - lse(z) + lse(zr)
//   rows with t == -100: all outputs 0, zero gradient.
// Backward (gradients for hidden and weight only; upstream g for logp, g_kl for kl):
//   dz_v = g (1[v == t] - p_v) + g_kl p_v ((z_v - zr_v) - E_p[z - zr]);  dx = dz / T
// ((z_v - zr_v) - E_p[z - zr] equals (log p_v - log q_v) - kl.)
// Caution: fp32 only (the wrapper converts). kl is a difference of logit-sized fp32/fp64
// quantities, so values below ~1e-6 are rounding-dominated and may be slightly negative.
// ref_hidden / ref_weight may have their own width d_ref; they share N and V with the policy.
#include <torch/library.h>

#include "vocab_tile.h"

namespace engine_ops {
namespace {

// Forward statistics of one row over one tile. z, zr: [n] raw policy / reference logits.
ENGINE_VEC_CLONES
void row_fwd_kl(const float* z, const float* zr, int64_t n, float inv_t, int64_t tgt,
                RowStats* sp, RowStats* sq, float* zt, float* zrt) {
  float mp = -std::numeric_limits<float>::infinity(), mq = mp;
#pragma omp simd reduction(max : mp, mq)
  for (int64_t v = 0; v < n; ++v) {
    mp = std::max(mp, z[v] * inv_t);
    mq = std::max(mq, zr[v] * inv_t);
  }
  const float mp_new = std::max(sp->m, mp), mq_new = std::max(sq->m, mq);
  float s_p = 0.f, a = 0.f, s_q = 0.f;
#pragma omp simd reduction(+ : s_p, a, s_q)
  for (int64_t v = 0; v < n; ++v) {
    const float zs = z[v] * inv_t, zrs = zr[v] * inv_t;
    const float e = fast_exp(zs - mp_new);
    s_p += e;
    a += e * (zs - zrs);
    s_q += fast_exp(zrs - mq_new);
  }
  if (tgt >= 0 && tgt < n) {
    *zt = z[tgt] * inv_t;
    *zrt = zr[tgt] * inv_t;
  }
  merge(*sp, mp_new, s_p, a, /*shift_u=*/false);
  merge(*sq, mq_new, s_q, 0.0, /*shift_u=*/false);
}

// Backward of one row over one tile, in place on z (raw policy logits in, dx out).
// zr may be null when g_kl == 0 (the reference tile is then not recomputed).
ENGINE_VEC_CLONES
void row_bwd_kl(float* z, const float* zr, int64_t n, float inv_t, int64_t tgt, float lse,
                float eu, float g, float g_kl) {
  const float gi = g * inv_t, gki = g_kl * inv_t;
  if (zr != nullptr) {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      const float zs = z[v] * inv_t;
      const float p = fast_exp(zs - lse);
      z[v] = p * (gki * ((zs - zr[v] * inv_t) - eu) - gi);
    }
  } else {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) z[v] = -gi * fast_exp(z[v] * inv_t - lse);
  }
  if (tgt >= 0 && tgt < n) z[tgt] += gi;
}

void check_kl_args(const at::Tensor& hidden, const at::Tensor& weight,
                   const at::Tensor& ref_hidden, const at::Tensor& ref_weight,
                   const at::Tensor& targets) {
  for (const at::Tensor* t : {&hidden, &weight, &ref_hidden, &ref_weight, &targets})
    TORCH_CHECK(t->device().is_cpu(), "engine_ops::linear_kl: CPU tensors expected");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [N, d] and weight [V, d] expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(ref_hidden.dim() == 2 && ref_weight.dim() == 2 &&
                  ref_hidden.size(1) == ref_weight.size(1),
              "ref_hidden [N, d_ref] and ref_weight [V, d_ref] expected, got ",
              ref_hidden.sizes(), " and ", ref_weight.sizes());
  TORCH_CHECK(ref_hidden.size(0) == hidden.size(0) && ref_weight.size(0) == weight.size(0),
              "policy and reference must share N and V");
  for (const at::Tensor* t : {&hidden, &weight, &ref_hidden, &ref_weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "engine_ops::linear_kl takes fp32, got ",
                t->scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == hidden.size(0),
              "targets must be int64 [N] with N = ", hidden.size(0));
}

// Returns (logp, ref_logp, kl, lse, eu) [N] fp32; lse = lse(z) and eu = E_p[z - zr] are saved
// for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_fwd(
    const at::Tensor& hidden_, const at::Tensor& weight_, const at::Tensor& ref_hidden_,
    const at::Tensor& ref_weight_, const at::Tensor& targets_, double temperature) {
  check_kl_args(hidden_, weight_, ref_hidden_, ref_weight_, targets_);
  TORCH_CHECK(temperature > 0, "temperature must be > 0");
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous();
  const at::Tensor ref_hidden = ref_hidden_.contiguous(), ref_weight = ref_weight_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const float inv_t = static_cast<float>(1.0 / temperature);
  auto opt = hidden.options();
  at::Tensor logp = at::zeros({N}, opt), rlogp = at::zeros({N}, opt), kl = at::zeros({N}, opt);
  at::Tensor lse = at::zeros({N}, opt), eu = at::zeros({N}, opt);
  if (N == 0) return {logp, rlogp, kl, lse, eu};
  TORCH_CHECK(V > 0, "weight has an empty vocabulary");
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t RB = std::min(kRowBlock, N), VT = std::min(kVocabTile, V);
  at::Tensor buf = at::empty({RB * VT}, opt), rbuf = at::empty({RB * VT}, opt);
  std::vector<RowStats> sp(RB), sq(RB);
  std::vector<float> zt(RB), zrt(RB);
  for (int64_t r0 = 0; r0 < N; r0 += RB) {
    const int64_t rb = std::min(RB, N - r0);
    const at::Tensor h_blk = hidden.narrow(0, r0, rb), rh_blk = ref_hidden.narrow(0, r0, rb);
    std::fill(sp.begin(), sp.end(), RowStats{});
    std::fill(sq.begin(), sq.end(), RowStats{});
    std::fill(zt.begin(), zt.end(), 0.f);
    std::fill(zrt.begin(), zrt.end(), 0.f);
    for (int64_t v0 = 0; v0 < V; v0 += VT) {
      const int64_t vt = std::min(VT, V - v0);
      at::Tensor tile = tile_view(buf, rb, vt), rtile = tile_view(rbuf, rb, vt);
      at::mm_out(tile, h_blk, weight.narrow(0, v0, vt).t());
      at::mm_out(rtile, rh_blk, ref_weight.narrow(0, v0, vt).t());
      const float* tp = tile.data_ptr<float>();
      const float* rp = rtile.data_ptr<float>();
      at::parallel_for(0, rb, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          row_fwd_kl(tp + i * vt, rp + i * vt, vt, inv_t, tg[r0 + i] - v0, &sp[i], &sq[i],
                     &zt[i], &zrt[i]);
      });
    }
    float* lp_out = logp.data_ptr<float>() + r0;
    float* rlp_out = rlogp.data_ptr<float>() + r0;
    float* kl_out = kl.data_ptr<float>() + r0;
    float* lse_out = lse.data_ptr<float>() + r0;
    float* eu_out = eu.data_ptr<float>() + r0;
    for (int64_t i = 0; i < rb; ++i) {
      const double lp = static_cast<double>(sp[i].m) + std::log(sp[i].s);
      const double lq = static_cast<double>(sq[i].m) + std::log(sq[i].s);
      const double e_u = sp[i].u / sp[i].s;
      lse_out[i] = static_cast<float>(lp);
      eu_out[i] = static_cast<float>(e_u);
      const int64_t t = tg[r0 + i];
      if (t == kIgnoreIndex) continue;
      TORCH_CHECK(t >= 0 && t < V, "target ", t, " at row ", r0 + i, " is outside [0, ", V,
                  ") and is not -100");
      lp_out[i] = static_cast<float>(zt[i] - lp);
      rlp_out[i] = static_cast<float>(zrt[i] - lq);
      kl_out[i] = static_cast<float>(e_u - lp + lq);
    }
  }
  return {logp, rlogp, kl, lse, eu};
}

// Returns (grad_hidden [N, d], grad_weight [V, d]) fp32. grad_kl may be empty (then the
// reference logits are not recomputed).
std::tuple<at::Tensor, at::Tensor> linear_kl_bwd(
    const at::Tensor& grad_logp_, const at::Tensor& grad_kl_, const at::Tensor& hidden_,
    const at::Tensor& weight_, const at::Tensor& ref_hidden_, const at::Tensor& ref_weight_,
    const at::Tensor& targets_, const at::Tensor& lse_, const at::Tensor& eu_,
    double temperature) {
  check_kl_args(hidden_, weight_, ref_hidden_, ref_weight_, targets_);
  const at::Tensor hidden = hidden_.contiguous(), weight = weight_.contiguous();
  const at::Tensor ref_hidden = ref_hidden_.contiguous(), ref_weight = ref_weight_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  const bool has_kl = grad_kl_.numel() > 0;
  const at::Tensor g_lp = grad_logp_.to(at::kFloat).contiguous();
  const at::Tensor g_kl = has_kl ? grad_kl_.to(at::kFloat).contiguous() : g_lp;
  const at::Tensor lse = lse_.contiguous(), eu = eu_.contiguous();
  TORCH_CHECK(g_lp.numel() == N && g_kl.numel() == N && lse.numel() == N && eu.numel() == N,
              "linear_kl_bwd: per-row tensors must have N = ", N, " elements");
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor dh = at::zeros_like(hidden), dw = at::zeros_like(weight);
  if (N == 0 || V == 0) return {dh, dw};
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float *glp = g_lp.data_ptr<float>(), *gkl = g_kl.data_ptr<float>();
  const float *lsep = lse.data_ptr<float>(), *eup = eu.data_ptr<float>();
  const int64_t RB = std::min(kRowBlock, N), VT = std::min(kVocabTile, V);
  at::Tensor buf = at::empty({RB * VT}, hidden.options());
  at::Tensor rbuf = has_kl ? at::empty({RB * VT}, hidden.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += RB) {
    const int64_t rb = std::min(RB, N - r0);
    const at::Tensor h_blk = hidden.narrow(0, r0, rb);
    at::Tensor dh_blk = dh.narrow(0, r0, rb);
    for (int64_t v0 = 0; v0 < V; v0 += VT) {
      const int64_t vt = std::min(VT, V - v0);
      const at::Tensor w_tile = weight.narrow(0, v0, vt);
      at::Tensor tile = tile_view(buf, rb, vt);
      at::mm_out(tile, h_blk, w_tile.t());
      const float* rp = nullptr;
      if (has_kl) {
        at::Tensor rtile = tile_view(rbuf, rb, vt);
        at::mm_out(rtile, ref_hidden.narrow(0, r0, rb), ref_weight.narrow(0, v0, vt).t());
        rp = rtile.data_ptr<float>();
      }
      float* tp = tile.data_ptr<float>();
      at::parallel_for(0, rb, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t row = r0 + i;
          if (tg[row] == kIgnoreIndex) {  // no gradient through ignored rows
            std::fill(tp + i * vt, tp + (i + 1) * vt, 0.f);
            continue;
          }
          row_bwd_kl(tp + i * vt, rp ? rp + i * vt : nullptr, vt, inv_t, tg[row] - v0,
                     lsep[row], eup[row], glp[row], has_kl ? gkl[row] : 0.f);
        }
      });
      // fixed-order, single-writer accumulation: deterministic without atomics
      dh_blk.addmm_(tile, w_tile);
      dw.narrow(0, v0, vt).addmm_(tile.t(), h_blk);
    }
  }
  return {dh, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine_ops, CPU, m) {
  m.impl("linear_kl_fwd", &linear_kl_fwd);
  m.impl("linear_kl_bwd", &linear_kl_bwd);
}

}  // namespace engine_ops
