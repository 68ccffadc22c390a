// Register-blocked fp32 matrix product C (+)= A * B for the attention blocks.
//   A: M x K, element (r, k) at A[r * a_row + k * a_col] (any layout: plain or transposed).
//   B: K x N, N a multiple of kLanes, read as vectors of kLanes columns: vector column v, row k at
//      B.data + v * B.vec_step + k * B.k_step. Row-major: vec_step = kLanes, k_step = ldb.
//      Panel layout (what K^T / V^T are staged in): vec_step = K * kLanes, k_step = kLanes, so
//      each vector column is one contiguous stream (no cache-set conflicts for long rows).
//   C: M x N row-major, leading dimension ldc.
// Each tile keeps MR x NV vectors of C in registers: per k, NV vector loads + MR broadcasts +
// MR * NV FMAs. gemm() walks B in blocks of gemm_kc(B) rows that stay in L1 while all the row
// tiles of A pass over them.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "cpu/simd.h"

namespace flash_attention::cpu {

struct MatB {
  const float* data;
  int64_t k_step;
  int64_t vec_step;
  static MatB row_major(const float* data, int64_t ldb) { return {data, ldb, kLanes}; }
  // Panel layout with K rows per panel; `col` (a multiple of kLanes) is the first column.
  static MatB panels(const float* data, int K, int col) {
    return {data + int64_t{col} * K, kLanes, int64_t{K} * kLanes};
  }
  // The rows from k0 on.
  MatB from_row(int k0) const { return {data + k0 * k_step, k_step, vec_step}; }
};

// accumulate: C += A B, with C first scaled by c_scale[r] per row when c_scale is given.
template <int MR, int NV>
void gemm_tile(int K, const float* A, int64_t a_row, int64_t a_col, MatB B, float* C, int64_t ldc,
               bool accumulate, const float* c_scale) {
  vfloat acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const vfloat scale = vsplat(c_scale ? c_scale[r] : 1.f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(C + r * ldc + v * kLanes) * scale : vfloat{};
  }
  for (int k = 0; k < K; ++k) {
    const float* b = B.data + k * B.k_step;
    vfloat bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + v * B.vec_step);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vfloat a = vsplat(A[r * a_row + k * a_col]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * kLanes, acc[r][v]);
}

constexpr int kGemmMR = 6;
constexpr int kGemmNV = 4;

// kTiles[mr - 1][nv - 1] = gemm_tile<mr, nv>, for the edge tiles of any M and N.
using GemmTile = void (*)(int, const float*, int64_t, int64_t, MatB, float*, int64_t, bool, const float*);
template <int MR, int... NV>
constexpr std::array<GemmTile, kGemmNV> tile_row(std::integer_sequence<int, NV...>) {
  return {gemm_tile<MR, NV + 1>...};
}
template <int... MR>
constexpr std::array<std::array<GemmTile, kGemmNV>, kGemmMR> tile_table(std::integer_sequence<int, MR...>) {
  return {tile_row<MR + 1>(std::make_integer_sequence<int, kGemmNV>{})...};
}
inline constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kGemmMR>{});

// Rows of B (the K dimension) per pass over the M rows of A: the kc x kGemmNV-vector block of B
// that a pass reads should stay in L1 (32 KiB of it) across the M / MR tiles. A row of that block
// occupies max(k_step, kGemmNV * kLanes) floats of cache sets (rows a large stride apart leave
// the sets of their gaps unused), so deep blocks for panels and short rows, shallow for long rows.
inline int gemm_kc(const MatB& B) {
  return static_cast<int>(std::max<int64_t>(16, 8192 / std::max<int64_t>(B.k_step, kGemmNV * kLanes)));
}

// C (+)= A B; with accumulate and c_scale, C is scaled row-wise by c_scale first (in the same pass:
// the online softmax's rescale of O rides on the P V product).
inline void gemm(int M, int N, int K, const float* A, int64_t a_row, int64_t a_col, MatB B, float* C,
                 int64_t ldc, bool accumulate, const float* c_scale = nullptr) {
  const int kc_max = gemm_kc(B);
  for (int n0 = 0; n0 < N; n0 += kGemmNV * kLanes) {
    const int nv = std::min(kGemmNV, (N - n0) / kLanes);
    for (int k0 = 0; k0 < K; k0 += kc_max) {
      const int kc = std::min(kc_max, K - k0);
      const MatB b{B.data + (n0 / kLanes) * B.vec_step + k0 * B.k_step, B.k_step, B.vec_step};
      for (int m0 = 0; m0 < M; m0 += kGemmMR) {
        const int mr = std::min(kGemmMR, M - m0);
        kTiles[mr - 1][nv - 1](kc, A + m0 * a_row + k0 * a_col, a_row, a_col, b, C + m0 * ldc + n0, ldc,
                               accumulate || k0 > 0, k0 == 0 && c_scale ? c_scale + m0 : nullptr);
      }
    }
  }
}

}  // namespace flash_attention::cpu
