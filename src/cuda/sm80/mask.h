// The attention mask as a small policy: bounds (key < seqlen_k), causal and sliding window, all
// bottom-right aligned. Query row i may see key j iff
//     col_begin(i) <= j < col_end(i).
// `block_range` tells a CTA which key blocks it must visit at all and which of them need the
// element-wise mask, so full blocks run without it.
#pragma once

#include <cute/tensor.hpp>

namespace flash_attention::sm80 {

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Key blocks [n_min, n_max) are visited; blocks in [unmasked_lo, unmasked_hi) need no mask.
struct BlockRange {
  int n_min, n_max, unmasked_lo, unmasked_hi;
  __device__ bool empty() const { return n_max <= n_min; }
  __device__ bool needs_mask(int n_block) const { return n_block >= unmasked_hi || n_block < unmasked_lo; }
};

struct MaskPolicy {
  int seqlen_q, seqlen_k;
  int window_left, window_right;  // -1 = unbounded

  // Exclusive upper key bound of row i (may be <= 0).
  __device__ int col_end(int i) const {
    const int diag = i + seqlen_k - seqlen_q;
    return window_right < 0 ? seqlen_k : min(seqlen_k, diag + window_right + 1);
  }
  // Inclusive lower key bound of row i (>= 0).
  __device__ int col_begin(int i) const {
    const int diag = i + seqlen_k - seqlen_q;
    return window_left < 0 ? 0 : max(0, diag - window_left);
  }

  template <int kBlockM, int kBlockN>
  __device__ BlockRange block_range(int m_block) const {
    const int first_row = m_block * kBlockM;
    const int last_row = min(first_row + kBlockM, seqlen_q) - 1;
    BlockRange r;
    r.n_min = col_begin(first_row) / kBlockN;
    r.n_max = ceil_div(max(col_end(last_row), 0), kBlockN);
    r.unmasked_hi = min(max(max(col_end(first_row), 0) / kBlockN, r.n_min), max(r.n_max, r.n_min));
    r.unmasked_lo = min(max(ceil_div(col_begin(last_row), kBlockN), r.n_min), r.unmasked_hi);
    return r;
  }

  // Sets masked scores to -inf. `scores` and `coords` are (row, col) views of one accumulator tile;
  // coords hold tile-local (row, col); row0 / col0 are the tile's first query row / key.
  template <class Scores, class Coords>
  __device__ void apply(Scores& scores, const Coords& coords, int row0, int col0) const {
    CUTE_UNROLL
    for (int mi = 0; mi < cute::size<0>(scores); ++mi) {
      const int i = row0 + cute::get<0>(coords(mi, 0));
      const int begin = col_begin(i) - col0;
      const int end = col_end(i) - col0;
      CUTE_UNROLL
      for (int ni = 0; ni < cute::size<1>(scores); ++ni) {
        const int j = cute::get<1>(coords(mi, ni));
        if (j < begin || j >= end) scores(mi, ni) = -INFINITY;
      }
    }
  }
};

}  // namespace flash_attention::sm80
