// Internal entry points of the CUDA implementation (compiled only with FLASH_ATTENTION_WITH_CUDA).
// src/common/api.cpp routes the public API here after validation; without CUDA it reports
// kNotSupported instead of calling these.
#pragma once

#include <string>
#include <vector>

#include "flash_attention/flash_attention.h"

namespace flash_attention::cuda {

// params are validated and normalised; pointers are device pointers; params.stream is a cudaStream_t.
Status forward(const ForwardParams& params);
Status backward(const BackwardParams& params);
Status dropout_mask(uint64_t seed, uint64_t offset, float p, int batch, int heads, int seqlen_q,
                    int seqlen_k, uint8_t* mask, void* stream);

// "" when the kernels can serve `params` on a device of compute capability `arch` (e.g. 90).
std::string unsupported_reason(const ForwardParams& params, int arch);
std::vector<int> archs_built();
std::vector<KernelConfig> configs(int arch, int head_dim, DType dtype);

}  // namespace flash_attention::cuda
