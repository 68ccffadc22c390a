// Door into the Hopper (sm90a: wgmma + TMA, warp-specialised) kernels. Compiled only when "90a" is in
// FLASH_ATTENTION_CUDA_ARCHS (FLASH_ATTENTION_WITH_SM90). src/cuda's dispatch asks `unsupported_reason`
// first and falls back to the sm80 path (which also runs on sm90) when it is non-empty.
#pragma once

#include <string>
#include <vector>

#include "flash_attention/flash_attention.h"

namespace flash_attention::sm90 {

std::string unsupported_reason(const ForwardParams& params);   // "" = this path serves it
Status forward(const ForwardParams& params);
std::string backward_unsupported_reason(const BackwardParams& params);
Status backward(const BackwardParams& params);
std::vector<KernelConfig> configs(int head_dim, DType dtype);

}  // namespace flash_attention::sm90
