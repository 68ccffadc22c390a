// Portable 16-lane float vectors (GCC/Clang vector extensions) and the few vector functions the
// CPU kernels need. With -march=native on AVX-512 one vfloat is one zmm register; elsewhere the
// compiler splits it into narrower registers.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// These helpers are internal and inline: the vector calling convention is no ABI concern (GCC
// warns at each call site in builds without AVX-512, so the warning stays off for the including file).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace flash_attention::cpu {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline vfloat vsplat(float x) { return vfloat{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
// a > b ? a : b per lane (so b where either is NaN): exactly what vmaxps does, which GCC does not
// see in the plain expression (it emits a compare and a blend).
#if defined(__AVX512F__)
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_mask_max_ps(a, 0xffff, a, b); }
#else
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
#endif

inline vint viota() { return vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

// Lane permutation (GCC: __builtin_shuffle, Clang: __builtin_shufflevector).
template <int... I>
inline vfloat permute(vfloat v) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, I...);
#else
  return __builtin_shuffle(v, vint{I...});
#endif
}

// Lanes of two vectors: index i < kLanes picks a[i], i >= kLanes picks b[i - kLanes].
template <int... I>
inline vfloat shuffle2(vfloat a, vfloat b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, I...);
#else
  return __builtin_shuffle(a, b, vint{I...});
#endif
}

// One butterfly stage of a 16 x 16 transpose: in each pair of rows (a, b) H apart, lanes with
// bit H set in a trade places with lanes with bit H clear in b (the off-diagonal H x H blocks).
template <int H, int... L>
inline void transpose_pair(vfloat& a, vfloat& b, std::integer_sequence<int, L...>) {
  const vfloat lo = shuffle2<((L & H) ? kLanes + L - H : L)...>(a, b);
  const vfloat hi = shuffle2<((L & H) ? kLanes + L : L + H)...>(a, b);
  a = lo;
  b = hi;
}
template <int H>
inline void transpose_stage(vfloat* v) {
  for (int i = 0; i < kLanes; ++i)
    if ((i & H) == 0) transpose_pair<H>(v[i], v[i + H], std::make_integer_sequence<int, kLanes>{});
}
// v[r] = row r of a 16 x 16 block becomes v[c] = column c (4 stages of 16 two-source permutes).
inline void transpose16(vfloat* v) {
  transpose_stage<8>(v);
  transpose_stage<4>(v);
  transpose_stage<2>(v);
  transpose_stage<1>(v);
}

// Log-depth horizontal reductions: fold the upper half of the lanes onto the lower half.
inline vfloat fold8(vfloat v) { return permute<8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7>(v); }
inline vfloat fold4(vfloat v) { return permute<4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11>(v); }
inline vfloat fold2(vfloat v) { return permute<2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13>(v); }
inline vfloat fold1(vfloat v) { return permute<1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14>(v); }
inline float hsum(vfloat v) {
  v += fold8(v);
  v += fold4(v);
  v += fold2(v);
  v += fold1(v);
  return v[0];
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^r for r in [-0.5, 0.5]: degree-5 minimax polynomial, about 2 ulp relative error.
inline vfloat exp2_poly(vfloat r) {
  vfloat p = vsplat(1.3276471e-3f);
  p = p * r + 9.6755410e-3f;
  p = p * r + 5.5507131e-2f;
  p = p * r + 2.4022120e-1f;
  p = p * r + 6.9314694e-1f;
  return p * r + 1.0000001f;
}

// 2^x for x < 128; exactly 0 for x < -126.5 and for -inf / NaN (so no subnormal P values reach
// the products). Round-to-nearest split x = n + r, 2^r by exp2_poly, times 2^n. With AVX-512
// the split and the scaling are one instruction each (roundscale, scalef) and a lane mask zeroes
// n <= -127; elsewhere x is clamped to -127 and 2^n assembled in the exponent bits (n = -127
// gives the bit pattern of +0). Both give the same bits.
#if defined(__AVX512F__)
inline vfloat vexp2(vfloat x) {
  // (masked forms with all lanes set: the plain ones trip GCC 12's -Wmaybe-uninitialized)
  const vfloat n = _mm512_mask_roundscale_ps(x, 0xffff, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 normal = _mm512_cmp_ps_mask(n, vsplat(-127.f), _CMP_GT_OQ);
  return _mm512_maskz_scalef_ps(normal, exp2_poly(x - n), n);
}
#else
inline vfloat vexp2(vfloat x) {
  const vfloat xc = vmax(x, vsplat(-127.f));
  const vfloat magic = vsplat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (xc + magic) - magic;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat pow2n;
  std::memcpy(&pow2n, &e, sizeof(pow2n));
  return exp2_poly(xc - n) * pow2n;
}
#endif

}  // namespace flash_attention::cpu
