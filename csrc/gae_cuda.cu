// engine_ops::gae for CUDA tensors: a second GPU implementation next to the Triton kernel in
// kernels/gae.py, one thread per sequence walking backwards over time in fp32.
//
//   delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t
//   A_t = m_t (delta_t + gamma lam m_{t+1} A_{t+1}),  R_t = m_t (A_t + V_t)
//
// Caution: one thread per sequence means strided (uncoalesced) loads when a warp's sequences
// are T floats apart; it is a simple baseline, not the fast path. Built only when CUDA is
// present (kernels/_cpp.py: gae_cuda); it registers the CUDA kernel of the engine_ops::gae
// schema defined in ops.cpp, so the CPU extension must be loaded first.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace engine_ops {
namespace {

__global__ void gae_kernel(const float* __restrict__ r,     // [B, T] rewards
                           const float* __restrict__ v,     // [B, T] values
                           const uint8_t* __restrict__ m,   // [B, T] mask, 0/1
                           float* __restrict__ adv,         // [B, T] out
                           float* __restrict__ ret,         // [B, T] out
                           int64_t B, int64_t T, float gamma, float gl) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t off = b * T;
  float a_next = 0.f, v_next = 0.f, m_next = 0.f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float mt = m[off + t] ? 1.f : 0.f;
    const float vt = v[off + t];
    const float delta = r[off + t] + gamma * v_next * m_next - vt;
    const float a = mt * (delta + gl * m_next * a_next);
    adv[off + t] = a;
    ret[off + t] = mt * (a + vt);
    a_next = a;
    v_next = vt;
    m_next = mt;
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(rewards.is_cuda() && values.is_cuda() && mask.is_cuda(),
              "gae_cuda: CUDA tensors expected");
  TORCH_CHECK(rewards.dim() == 2 && rewards.sizes() == values.sizes() &&
                  rewards.sizes() == mask.sizes(),
              "gae: rewards, values, mask must all be [B, T]");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.to(at::kFloat).contiguous();
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const at::Tensor m = mask.ne(0).to(at::kByte).contiguous();
  const int64_t B = r.size(0), T = r.size(1);
  at::Tensor adv = at::empty({B, T}, r.options()), ret = at::empty({B, T}, r.options());
  if (B == 0 || T == 0) return {adv, ret};
  const int threads = 128;
  const int blocks = static_cast<int>((B + threads - 1) / threads);
  gae_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<uint8_t>(), adv.data_ptr<float>(),
      ret.data_ptr<float>(), B, T, static_cast<float>(gamma), static_cast<float>(gamma * lam));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(engine_ops, CUDA, m) { m.impl("gae", &gae_cuda); }

}  // namespace engine_ops
