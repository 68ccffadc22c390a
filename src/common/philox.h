// Counter-based dropout randomness shared by the CPU implementation and the CUDA kernels, so both
// drop exactly the same elements for the same (seed, offset). Philox4x32-10 (Salmon et al., 2011).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FA_HOST_DEVICE inline
#endif

namespace flash_attention {

struct Philox4 {
  uint32_t x, y, z, w;
};

FA_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

FA_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, ctr.z, &hi1);
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// One uniform draw in [0, 1) per attention-matrix element (b, h, i, j); i and j are positions
// inside the sequence (varlen: relative to the sequence start). Four consecutive keys share one
// Philox call: element j uses word (j % 4) of the block for counter (j / 4).
FA_HOST_DEVICE Philox4 dropout_block(uint64_t seed, uint64_t offset, int64_t bh, int64_t i,
                                     int64_t j4) {
  const Philox4 ctr{static_cast<uint32_t>(j4), static_cast<uint32_t>(i),
                    static_cast<uint32_t>(bh) ^ static_cast<uint32_t>(offset >> 32) * 0x85EBCA6Bu,
                    static_cast<uint32_t>(offset)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FA_HOST_DEVICE float philox_word_to_uniform(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);  // 24 bits, exact in fp32
}

// True when element (b, h, i, j) survives dropout with probability 1 - p.
// bh = b * num_heads + h (query head).
FA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, int64_t bh, int64_t i, int64_t j,
                                 float p) {
  const Philox4 r = dropout_block(seed, offset, bh, i, j >> 2);
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
  return philox_word_to_uniform(words[j & 3]) >= p;
}

}  // namespace flash_attention
