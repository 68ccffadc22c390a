// dropout_mask(): the (B, H, Sq, Sk) keep mask, element by element from dropout_keep().
#include "common/philox.h"
#include "cpu/cpu_attention.h"

namespace flash_attention::cpu {

Status dropout_mask(uint64_t seed, uint64_t offset, float p, int batch, int heads, int seqlen_q, int seqlen_k,
                    uint8_t* mask) {
  const int64_t rows = int64_t{batch} * heads * seqlen_q;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t bh = row / seqlen_q, i = row % seqlen_q;
    uint8_t* out = mask + row * seqlen_k;
    for (int j = 0; j < seqlen_k; ++j) out[j] = dropout_keep(seed, offset, bh, i, j, p) ? 1 : 0;
  }
  return Status::Ok();
}

}  // namespace flash_attention::cpu
