// Rotary embedding of one pair of elements, in fp32 with the same rounding on the CPU and the GPU (one
// rounded product, then one fused multiply-add), so that the CUDA append writes the same cache bits as the
// CPU reference.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FA_ROTARY_FN __host__ __device__ __forceinline__
#else
#define FA_ROTARY_FN inline
#endif

namespace flash_attention::kv {

FA_ROTARY_FN float rotary_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
FA_ROTARY_FN void rotate_pair(float& x0, float& x1, float cos, float sin) {
  const float r0 = fmaf(x0, cos, -rotary_mul(x1, sin));
  const float r1 = fmaf(x0, sin, rotary_mul(x1, cos));
  x0 = r0;
  x1 = r1;
}

// Indices of pair t (t < rotary_dim / 2) inside a head row.
FA_ROTARY_FN int rotary_first(int t, int rotary_dim, bool interleaved) { return interleaved ? 2 * t : t; }
FA_ROTARY_FN int rotary_second(int t, int rotary_dim, bool interleaved) {
  return interleaved ? 2 * t + 1 : t + rotary_dim / 2;
}

}  // namespace flash_attention::kv
