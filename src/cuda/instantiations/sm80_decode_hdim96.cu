// Split-KV attention over a KV cache (src/cuda/decode/decode_kernel.cuh), head dim 96, fp16 and bf16.
#include "cuda/decode/decode_kernel.cuh"

namespace flash_attention::cuda::decode {

template struct DecodeKernel<96, __half>;
template struct DecodeKernel<96, __nv_bfloat16>;

}  // namespace flash_attention::cuda::decode
