// Python bindings of lkfast._C. The op layer (lkfast/ops) is the only caller.
#include <torch/extension.h>

#include "cpu/dwconv_cpu.h"
#include "cuda/dwconv_cuda_limits.h"  // plain host C++: in every build, CPU-only ones too
#ifdef LKFAST_WITH_CUDA
#include "cuda/dwconv_cuda.h"
#endif

namespace {

// The CUDA kernels' launch sizes and refusals (dwconv_cuda_limits.h) for x of `shape` (N, C, H, W)
// in `dtype` with a kh x kw kernel: host arithmetic, so that the dispatcher can ask it, and the CPU
// tests check it, without a GPU or a CUDA build.
lkfast::cuda::LaunchSizes cuda_launch_sizes(const std::vector<int64_t>& shape, int64_t kh, int64_t kw,
                                            at::ScalarType dtype) {
  TORCH_CHECK(shape.size() == 4, "cuda_launch_sizes: shape must be (N, C, H, W), got ", shape.size(), " sizes");
  return lkfast::cuda::launch_sizes(shape[0], shape[2], shape[3], static_cast<int>(kh), static_cast<int>(kw),
                                    static_cast<int>(c10::elementSize(dtype)));
}

std::string cuda_launch_refusal(const std::vector<int64_t>& shape, int64_t kh, int64_t kw, at::ScalarType dtype,
                                const c10::optional<int64_t>& smem_optin) {
  cuda_launch_sizes(shape, kh, kw, dtype);  // checks the shape
  std::string name = py::str(py::cast(dtype));  // "torch.float64": the name as users write it, float64
  name = name.substr(name.find('.') + 1);
  return lkfast::cuda::launch_refusal(shape[0], shape[2], shape[3], static_cast<int>(kh), static_cast<int>(kw),
                                      static_cast<int>(c10::elementSize(dtype)), name, smem_optin.value_or(0));
}

py::dict as_dict(const lkfast::cuda::LaunchSizes& s) {
  const lkfast::cuda::ForwardTiling& t = s.forward_tiling;
  py::dict d;
  d["forward_tiling"] = py::make_tuple(t.rb, t.rw, t.txn, t.tyn);  // (RB, RW, TXN, TYN)
  d["forward_pitch"] = s.forward_pitch;
  d["forward_smem"] = s.forward_smem;
  d["forward_tiles"] = s.forward_tiles;
  d["weight_grad_pitch"] = s.weight_grad_pitch;
  d["weight_grad_smem"] = s.weight_grad_smem;
  d["weight_grad_items"] = s.weight_grad_items;
  d["weight_grad_phases"] = s.weight_grad_phases;
  d["weight_grad_launches"] = s.weight_grad_launches;
  d["nhwc_forward_tiles"] = s.nhwc_forward_tiles;
  d["nhwc_weight_grad_rows"] = s.nhwc_weight_grad_rows;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lkfast compiled kernels: depthwise large-kernel convolution";
  m.def("cpu_forward", &lkfast::cpu::forward, "depthwise conv forward on CPU", py::arg("x"),
        py::arg("weight"), py::arg("bias") = py::none(), py::arg("flip") = false);
  m.def("cpu_weight_grad", &lkfast::cpu::weight_grad, "depthwise conv weight gradient on CPU",
        py::arg("grad_out"), py::arg("x"), py::arg("kh"), py::arg("kw"));
  m.def("cpu_isa", &lkfast::cpu::isa_name, "instruction set the CPU kernels use");
  m.def("cpu_isa_note", &lkfast::cpu::isa_note, "why the CPU kernels run below this CPU's best, or ''");
  m.def("cuda_launch_sizes",
        [](const std::vector<int64_t>& shape, int64_t kh, int64_t kw, at::ScalarType dtype) {
          return as_dict(cuda_launch_sizes(shape, kh, kw, dtype));
        },
        "the CUDA kernels' launch sizes for x of this shape and dtype with a kh x kw kernel: the NCHW "
        "forward's tiling (RB, RW, TXN, TYN), shared-memory pitch (elements), bytes per block and tiles; "
        "the NCHW weight gradient's pitch, bytes, items, thread phases and launches; the channels_last "
        "forward's tiles and weight gradient's rows",
        py::arg("shape"), py::arg("kh"), py::arg("kw"), py::arg("dtype"));
  m.def("cuda_launch_refusal", &cuda_launch_refusal,
        "why a CUDA kernel would refuse to launch for x of this shape and dtype with a kh x kw kernel "
        "on a GPU allowing smem_optin bytes of shared memory per block (None: not checked); '' when "
        "every kernel launches",
        py::arg("shape"), py::arg("kh"), py::arg("kw"), py::arg("dtype"), py::arg("smem_optin") = py::none());
#ifdef LKFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  lkfast::cuda::bind(m);
#else
  m.attr("with_cuda") = false;
#endif
}
