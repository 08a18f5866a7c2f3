// engine_ops::gae on CPU: masked GAE, one reverse loop per sequence, OpenMP over sequences.
//
//   delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t
//   A_t = m_t (delta_t + gamma lam m_{t+1} A_{t+1}),  R_t = m_t (A_t + V_t)
//   with V_T = A_T = m_T = 0 past the end; m_t = (mask_t != 0). fp32 accumulation.
// Caution: sequential in t, so it matches the reference loop's summation order (fp32 vs fp64
// rounding only). Sequences are independent: bit-identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace engine_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2 && rewards.sizes() == values.sizes() &&
                  rewards.sizes() == mask.sizes(),
              "gae: rewards, values, mask must all be [B, T], got ", rewards.sizes(), ", ",
              values.sizes(), ", ", mask.sizes());
  TORCH_CHECK(rewards.is_floating_point() && values.is_floating_point(),
              "gae: rewards and values must be floating point");
  const at::Tensor r = rewards.to(at::kFloat).contiguous();
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const at::Tensor m = mask.ne(0).to(at::kByte).contiguous();
  const int64_t B = r.size(0), T = r.size(1);
  at::Tensor adv = at::empty({B, T}, r.options()), ret = at::empty({B, T}, r.options());
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const float *rp = r.data_ptr<float>(), *vp = v.data_ptr<float>();
  const uint8_t* mp = m.data_ptr<uint8_t>();
  float *ap = adv.data_ptr<float>(), *op = ret.data_ptr<float>();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* rb = rp + b * T;
      const float* vb = vp + b * T;
      const uint8_t* mb = mp + b * T;
      float a_next = 0.f, v_next = 0.f, m_next = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        const float mt = mb[t] ? 1.f : 0.f;
        const float delta = rb[t] + g * v_next * m_next - vb[t];
        const float a = mt * (delta + gl * m_next * a_next);
        ap[b * T + t] = a;
        op[b * T + t] = mt * (a + vb[t]);
        a_next = a;
        v_next = vb[t];
        m_next = mt;
      }
    }
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine_ops, CPU, m) { m.impl("gae", &gae_cpu); }

}  // namespace engine_ops
