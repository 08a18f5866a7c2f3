// Schemas of the engine's C++ ops. The CPU kernels are registered next to their code
// (linear_logprobs.cpp, linear_kl.cpp, gae.cpp, gelu.cpp), the CUDA GAE in gae_cuda.cu (separate build),
// and the fake (meta) kernels plus autograd in kernels/_cpp.py.
#include <torch/library.h>

TORCH_LIBRARY(engine_ops, m) {
  // -> (logp [N], entropy [N], lse [N]) fp32
  m.def("linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, float temperature)"
        " -> (Tensor, Tensor, Tensor)");
  // grad_entropy may be empty (numel 0) when the entropy output got no gradient
  m.def("linear_logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, "
        "Tensor weight, Tensor targets, Tensor lse, Tensor entropy, float temperature)"
        " -> (Tensor, Tensor)");
  // -> (logp, ref_logp, kl, lse, eu) [N] fp32; eu = E_p[z - zr]
  m.def("linear_kl_fwd(Tensor hidden, Tensor weight, Tensor ref_hidden, Tensor ref_weight, "
        "Tensor targets, float temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_kl may be empty (numel 0) when kl got no gradient
  m.def("linear_kl_bwd(Tensor grad_logp, Tensor grad_kl, Tensor hidden, Tensor weight, "
        "Tensor ref_hidden, Tensor ref_weight, Tensor targets, Tensor lse, Tensor eu, "
        "float temperature) -> (Tensor, Tensor)");
  // -> (advantages [B, T], returns [B, T]) fp32
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam)"
        " -> (Tensor, Tensor)");
  // tanh-approximate GELU, fp32 [any shape]
  m.def("gelu_tanh_fwd(Tensor x) -> Tensor");
  m.def("gelu_tanh_bwd(Tensor grad, Tensor x) -> Tensor");
}
