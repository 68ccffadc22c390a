// Portable 16-lane float vectors (GCC/Clang vector extensions) and the few vector functions the
// CPU kernels need. With -march=native on AVX-512 one vfloat is one zmm register; elsewhere the
// compiler splits it into narrower registers.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

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
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

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
inline float hmax(vfloat v) {
  v = vmax(v, fold8(v));
  v = vmax(v, fold4(v));
  v = vmax(v, fold2(v));
  v = vmax(v, fold1(v));
  return v[0];
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^x for x < 128 with about 2 ulp relative error; exactly 0 for x <= -127 (so -inf gives 0).
// Round-to-nearest split x = n + r, r in [-0.5, 0.5]; 2^r by a degree-5 minimax polynomial;
// 2^n assembled in the exponent bits (n = -127 gives the bit pattern of +0).
inline vfloat vexp2(vfloat x) {
  const vfloat xc = vmax(x, vsplat(-127.f));
  const vfloat magic = vsplat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (xc + magic) - magic;
  const vfloat r = xc - n;
  vfloat p = vsplat(1.3276471e-3f);
  p = p * r + 9.6755410e-3f;
  p = p * r + 5.5507131e-2f;
  p = p * r + 2.4022120e-1f;
  p = p * r + 6.9314694e-1f;
  p = p * r + 1.0000001f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat pow2n;
  std::memcpy(&pow2n, &e, sizeof(pow2n));
  return p * pow2n;
}

}  // namespace flash_attention::cpu
