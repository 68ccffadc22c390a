// Door into the CUDA KV-cache kernels (append + rotary, split-KV decode attention, combine). Compiled only
// with FLASH_ATTENTION_WITH_CUDA; src/cpu/kvcache_api.cpp routes here after validation.
#pragma once

#include <cstddef>

#include "flash_attention/kvcache.h"

namespace flash_attention::cuda {

// params validated and normalised (kv::normalize); device pointers; params.stream is a cudaStream_t.
// Checks the indices on the host first when params.check_indices (one stream synchronisation).
Status kvcache_forward(const KVCacheParams& params);
Status combine(const CombineParams& params);
std::size_t kvcache_workspace_size(const KVCacheParams& params);

}  // namespace flash_attention::cuda
