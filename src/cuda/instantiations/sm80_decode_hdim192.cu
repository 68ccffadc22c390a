// Split-KV attention over a KV cache (src/cuda/decode/decode_kernel.cuh), head dim 192, fp16 and bf16.
#include "cuda/decode/decode_kernel.cuh"

namespace flash_attention::cuda::decode {

template Status run_decode<192, __half>(const DecodeArgs&, cudaStream_t);
template Status run_decode<192, __nv_bfloat16>(const DecodeArgs&, cudaStream_t);

}  // namespace flash_attention::cuda::decode
