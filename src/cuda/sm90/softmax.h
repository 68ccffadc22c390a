// Register-level helpers for wgmma accumulators: (row, col) views, masking, online softmax.
//
// A wgmma accumulator fragment of one thread has layout ((2, 2, N/8), MMA_M, MMA_N):
//   mode 0.0: two adjacent columns, mode 0.1: rows r and r + 8, mode 0.2: column blocks of 8.
// The four threads of a quad (lane % 4) share their rows.
#pragma once

#include <cute/tensor.hpp>

namespace flash_attention::sm90 {

using namespace cute;

// ((2, 2, V), M, N) -> ((2, M), (2, V, N)): rows then columns.
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(L const& l) {
  auto v = get<0>(l);
  return make_layout(make_layout(get<1>(v), get<1>(l)),
                     make_layout(get<0>(v), get<2>(v), get<2>(l)));
}

// ((2, 2, V), M, N) -> ((2, 2, 2), M, (V/2, N)): the same registers as the A operand of a k16 wgmma.
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(L const& l) {
  auto v = get<0>(l);
  auto blocks = logical_divide(get<2>(v), Shape<_2>{});  // ((2, V/2))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<0, 0>(blocks)), get<1>(l),
                     make_layout(get<0, 1>(blocks), get<2>(l)));
}

CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax over the rows a thread owns. Scores stay raw (unscaled) in registers; the exponent
// scale is applied inside exp2 (one FFMA per element).
template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // this thread's partial sums; reduced over the quad in finalize()
  float scale_log2;

  CUTE_DEVICE explicit OnlineSoftmax(float scale) : scale_log2(scale) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // Replaces the scores `s` (rows x cols view) by exp(score - row max) and returns in `factor` the
  // rescale to apply to everything accumulated before. A row's max moves only when the block's max
  // exceeds it by more than `slack` (log2 units; 0: whenever it grows): until then factor is exactly 1
  // and P may reach 2^slack. Returns whether some row of this thread moved (factor may differ from 1);
  // when no thread of a warp did, its O rescale can be skipped (the result is the same).
  template <class Tensor>
  CUTE_DEVICE bool update(Tensor& s, float (&factor)[kRows], float slack) {
    static_assert(decltype(size<0>(s))::value == kRows);
    bool moved = false;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) m = fmaxf(m, s(r, c));
      m = quad_max(m);
      const bool move = row_max[r] == -INFINITY || (m - row_max[r]) * scale_log2 > slack;
      const float m_new = move ? m : row_max[r];
      // A row with nothing visible so far keeps max -inf: use 0 so exp2 gives 0, not NaN.
      const float m_scaled = m_new == -INFINITY ? 0.f : m_new * scale_log2;
      factor[r] = move ? exp2f(row_max[r] * scale_log2 - m_scaled) : 1.f;
      moved |= move;
      row_max[r] = m_new;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        s(r, c) = exp2f(s(r, c) * scale_log2 - m_scaled);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * factor[r] + sum;
    }
    return moved;
  }

  // Final 1/rowsum per row (0 for rows that saw no key) and the natural-log LSE (+inf for those).
  CUTE_DEVICE void finalize(float (&inv_sum)[kRows], float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool empty = !(sum > 0.f);
      inv_sum[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? INFINITY : (row_max[r] * scale_log2) * float(M_LN2) + __logf(sum);
    }
  }
};

template <class Tensor, int kRows>
CUTE_DEVICE void scale_rows(Tensor& t, const float (&factor)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(t); ++c) t(r, c) *= factor[r];
  }
}

}  // namespace flash_attention::sm90
