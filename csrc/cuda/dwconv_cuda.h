// lkfast CUDA kernels: depthwise convolution with large odd kernels, stride 1, zero "same" padding.
// Declarations for the host wrappers (dwconv_cuda.cu) and the pybind11 registration (bind).
// bindings.cpp includes this file only when built with LKFAST_WITH_CUDA.
#pragma once
#include <torch/extension.h>

namespace lkfast {
namespace cuda {
// y = depthwise_conv2d(x, weight rotated by 180 degrees when flip, bias); y is channels_last when
// x is (computed by the channels_last kernels), contiguous otherwise. fp32/fp16/bf16 accumulate in
// fp32, fp64 in fp64.
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, bool flip);
// dL/dweight, shape (C, 1, kh, kw) in x's dtype, from dL/dy and x (same shape, any strides).
// Split-K over (batch, spatial tiles), or (batch, rows) for channels_last x, into an fp32 workspace,
// then one deterministic sum.
at::Tensor weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t kh, int64_t kw);
// Registers cuda_forward and cuda_weight_grad on the extension module. Defined here, so that
// bindings.cpp (which parses torch/extension.h anyway) compiles it: a translation unit of its own
// cost a second torch/extension.h parse, the longest single step of the CUDA build.
inline void bind(pybind11::module_& m) {
  m.def("cuda_forward", &forward,
        "depthwise conv forward on CUDA (flip=True rotates the kernel: the input gradient)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("flip") = false);
  m.def("cuda_weight_grad", &weight_grad, "depthwise conv weight gradient on CUDA",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("kh"), pybind11::arg("kw"));
}
}  // namespace cuda
}  // namespace lkfast
