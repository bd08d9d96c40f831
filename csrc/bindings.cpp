// Python bindings of lkfast._C. The op layer (lkfast/ops) is the only caller.
#include <torch/extension.h>

#include "cpu/dwconv_cpu.h"
#ifdef LKFAST_WITH_CUDA
#include "cuda/dwconv_cuda.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lkfast compiled kernels: depthwise large-kernel convolution";
  m.def("cpu_forward", &lkfast::cpu::forward, "depthwise conv forward on CPU", py::arg("x"),
        py::arg("weight"), py::arg("bias") = py::none(), py::arg("flip") = false);
  m.def("cpu_weight_grad", &lkfast::cpu::weight_grad, "depthwise conv weight gradient on CPU",
        py::arg("grad_out"), py::arg("x"), py::arg("kh"), py::arg("kw"));
  m.def("cpu_isa", &lkfast::cpu::isa_name, "instruction set the CPU kernels use");
#ifdef LKFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  lkfast::cuda::bind(m);
#else
  m.attr("with_cuda") = false;
#endif
}
