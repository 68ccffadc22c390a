// cuda::dropout_mask: the keep mask (1 = kept) of dropout_keep() for a (B, H, Sq, Sk) block, so tests
// and return_attn_probs can see exactly what the forward kernel dropped.
#include <cuda_runtime.h>

#include <string>

#include "common/philox.h"
#include "cuda/cuda_api.h"

namespace flash_attention::cuda {
namespace {

// One thread per group of four keys (one Philox draw).
__global__ void dropout_mask_kernel(uint64_t seed, uint64_t offset, float p, int heads, int seqlen_q,
                                    int seqlen_k, uint8_t* mask, int64_t groups) {
  const int groups_per_row = (seqlen_k + 3) / 4;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const int j4 = int(g % groups_per_row);
    const int64_t bhi = g / groups_per_row;  // (b * heads + h) * seqlen_q + i
    const int i = int(bhi % seqlen_q);
    const int64_t bh = bhi / seqlen_q;
    const Philox4 draw = dropout_block(seed, offset, bh, i, j4);
    const uint32_t words[4] = {draw.x, draw.y, draw.z, draw.w};
    uint8_t* row = mask + bhi * seqlen_k;
    for (int t = 0; t < 4 && j4 * 4 + t < seqlen_k; ++t) {
      row[j4 * 4 + t] = philox_word_to_uniform(words[t]) >= p ? 1 : 0;
    }
  }
}

}  // namespace

Status dropout_mask(uint64_t seed, uint64_t offset, float p, int batch, int heads, int seqlen_q, int seqlen_k,
                    uint8_t* mask, void* stream) {
  const int64_t groups = int64_t(batch) * heads * seqlen_q * ((seqlen_k + 3) / 4);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((groups + threads - 1) / threads, 65535);
  dropout_mask_kernel<<<unsigned(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, offset, p, heads, seqlen_q, seqlen_k, mask, groups);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::CudaError(std::string("flash_attention dropout_mask: ") + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace flash_attention::cuda
