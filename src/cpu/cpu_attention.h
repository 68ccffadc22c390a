// Internal entry points of the CPU implementation (the fallback and the reference).
#pragma once

#include "flash_attention/flash_attention.h"

namespace flash_attention::cpu {

// params are validated and normalised; pointers are host pointers.
Status forward(const ForwardParams& params);
Status backward(const BackwardParams& params);
Status dropout_mask(uint64_t seed, uint64_t offset, float p, int batch, int heads, int seqlen_q,
                    int seqlen_k, uint8_t* mask);

}  // namespace flash_attention::cpu
