// Layout of the packed tiles shared by the ATen side (dwconv_cpu.cpp) and the compute core
// (dwconv_kernel.h). Only constants: safe to include under `#pragma GCC target`.
#pragma once

namespace lkfast {
namespace cpu {
// Outputs per register block along W in the forward pass.
constexpr int kOutBlock = 8;
// Taps per register block along the kernel width in the weight gradient.
constexpr int kTapBlock = 8;
// Zero columns on each side of every packed weight row (forward) and output-gradient row
// (weight gradient), so that the "band" loops may index a whole register block past the edge.
constexpr int kWeightPad = kOutBlock - 1;
constexpr int kGradPad = kTapBlock - 1;
}  // namespace cpu
}  // namespace lkfast
