// Online softmax over key blocks with fp32 statistics, in base 2.
//
// Scores arrive in accumulator units s (see FwdArgs); p = exp2(s * scale_log2 - m * scale_log2) is one
// FFMA + EX2 per element. Each thread owns whole rows of its fragment except that a row's columns are
// spread over the 4 threads of a quad: row maxima are reduced over the quad at every block, row sums
// only once at the end.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "cuda/sm80/utils.h"

namespace flash_attention::sm80 {

// Maximum of s(r, kFirst .. kFirst + kCount - 1), as a tree (a short dependency chain).
template <int kFirst, int kCount, class Scores>
__device__ __forceinline__ float row_max_tree(const Scores& s, int r) {
  if constexpr (kCount == 1) {
    return s(r, kFirst);
  } else {
    constexpr int kHalf = kCount / 2;
    return fmaxf(row_max_tree<kFirst, kHalf>(s, r), row_max_tree<kFirst + kHalf, kCount - kHalf>(s, r));
  }
}

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];

  __device__ OnlineSoftmax() {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // Folds one block of scores (rows x cols view, overwritten by the unnormalised probabilities) into
  // the statistics and rescales the output accumulator rows. kCheckInf: rows may be fully masked so far.
  // A row whose maximum did not change has correction 1; when no row of the warp changed (the common
  // case after the first blocks of a long row) the output rescale is skipped altogether.
  template <bool kCheckInf, class Scores, class AccO>
  __device__ void update(Scores& s, AccO& o, float scale_log2) {
    constexpr int kCols = decltype(cute::size<1>(s))::value;
    float correction[kRows];
    bool changed = false;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float block_max = quad_allreduce(fmaxf(row_max[r], row_max_tree<0, kCols>(s, r)), MaxOp{});
      changed |= block_max != row_max[r];
      // A row with no visible key so far keeps max = -inf: use 0 so that exp2 gives 0, not NaN.
      const bool empty = kCheckInf && block_max == -INFINITY;
      const float max_scaled = empty ? 0.f : block_max * scale_log2;
      correction[r] = empty ? 1.f : exp2f((row_max[r] - block_max) * scale_log2);  // 0 on the first block
      row_max[r] = block_max;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < cute::size<1>(s); ++c) {
        s(r, c) = exp2f(s(r, c) * scale_log2 - max_scaled);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
    if (__any_sync(0xffffffffu, changed)) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < cute::size<1>(o); ++c) o(r, c) *= correction[r];
      }
    }
  }

  // Normalises the output rows (times `out_scale`, the dropout rescale) and returns each row's
  // natural-log LSE in lse[r]: +inf for rows that saw no key (their output is 0).
  template <class AccO>
  __device__ void finalize(AccO& o, float score_scale, float out_scale, float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_allreduce(row_sum[r], SumOp{});
      const bool empty = sum == 0.f || sum != sum;
      const float inv = empty ? 0.f : out_scale / sum;
      lse[r] = empty ? INFINITY : row_max[r] * score_scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < cute::size<1>(o); ++c) o(r, c) *= inv;
    }
  }
};

}  // namespace flash_attention::sm80
