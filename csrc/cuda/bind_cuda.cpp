// pybind11 registration of the CUDA kernels, compiled by the host compiler (keeps pybind11 out of
// nvcc, which is the slow part of building .cu files that include torch/extension.h).
#include "cuda/dwconv_cuda.h"

namespace lkfast {
namespace cuda {
void bind(pybind11::module_& m) {
  m.def("cuda_forward", &forward,
        "depthwise conv forward on CUDA (flip=True rotates the kernel: the input gradient)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("flip") = false);
  m.def("cuda_weight_grad", &weight_grad, "depthwise conv weight gradient on CUDA",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("kh"), pybind11::arg("kw"));
}
}  // namespace cuda
}  // namespace lkfast
