#pragma once
#include <ATen/ATen.h>
#include <string>

namespace lkfast {
namespace cpu {
// y = depthwise_conv2d(x, weight (flipped in both axes when flip), bias); y keeps x's layout.
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, bool flip);
// dL/dweight, shape (C, 1, kh, kw), from dL/dy and x (same shape, any strides).
at::Tensor weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t kh, int64_t kw);
// The instruction set the kernels run with: "avx512bf16", "avx512", "avx2" or "generic".
std::string isa_name();
// Why the CPU kernels run below what this CPU could run, or "" (see isa_note in dwconv_cpu.cpp).
std::string isa_note();
}  // namespace cpu
}  // namespace lkfast
