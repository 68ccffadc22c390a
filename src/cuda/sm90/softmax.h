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

// 2^x for x <= 0 on the FMA pipe (no MUFU): x = j + f with j = round(x), f in [-0.5, 0.5];
// 2^f by a degree-4 polynomial (relative error < 5e-5, below bf16/fp16 rounding of P), 2^j added to
// the exponent bits. Adding 1.5 * 2^23 leaves round(x) in the low mantissa bits of t, so t << 23
// is j << 23. x <= -127 (masked scores are -inf) gives exactly 0, as exp2 does.
CUTE_DEVICE float exp2_fma(float x) {
  constexpr float kRound = 12582912.f;
  const float xc = fmaxf(x, -127.f);
  const float t = __fadd_rn(xc, kRound);
  const float f = __fsub_rn(xc, __fsub_rn(t, kRound));
  float p = fmaf(f, 0.0096181291f, 0.0555041087f);
  p = fmaf(p, f, 0.2402265070f);
  p = fmaf(p, f, 0.6931471806f);
  p = fmaf(p, f, 1.f);
  const float r = __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
  return xc > -127.f ? r : 0.f;
}

// Online softmax over the rows a thread owns. Scores stay raw (unscaled) in registers; the exponent
// scale is applied inside exp2 (one FFMA per element).
// kExpOnFma: every 4th exponential runs on the FMA pipe (exp2_fma) instead of the MUFU unit. At small
// head dims MUFU throughput (16 exp2 / clock / SM on Hopper) bounds the kernel: one exp per 4 * D
// tensor-core FLOPs; moving a quarter of them to the 8x wider FMA pipe balances the two.
template <int kRows, bool kExpOnFma = false>
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

  // Replaces the scores `s` (rows x cols view) by exp(score - new max) and returns in `factor`
  // the rescale to apply to everything accumulated before.
  template <class Tensor>
  CUTE_DEVICE void update(Tensor& s, float (&factor)[kRows]) {
    static_assert(decltype(size<0>(s))::value == kRows);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float m = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) m = fmaxf(m, s(r, c));
      m = quad_max(m);
      // A row with nothing visible so far keeps max -inf: use 0 so exp2 gives 0, not NaN.
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      factor[r] = exp2f(row_max[r] * scale_log2 - m_scaled);
      row_max[r] = m;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        const float x = s(r, c) * scale_log2 - m_scaled;
        s(r, c) = (kExpOnFma && c % 4 == 3) ? exp2_fma(x) : exp2f(x);
        sum += s(r, c);
      }
      row_sum[r] = row_sum[r] * factor[r] + sum;
    }
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
