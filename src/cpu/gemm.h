// Register-blocked fp32 matrix product C (+)= A * B for the attention blocks.
//   A: M x K, element (r, k) at A[r * a_row + k * a_col] (any layout: plain or transposed).
//   B: K x N, N a multiple of kLanes, read as vectors of kLanes columns: vector column v, row k at
//      B.data + v * B.vec_step + k * B.k_step. Row-major: vec_step = kLanes, k_step = ldb.
//      Panel layout (what K^T / V^T are staged in): vec_step = K * kLanes, k_step = kLanes, so
//      each vector column is one contiguous stream (no cache-set conflicts for long rows).
//   C: M x N row-major, leading dimension ldc.
// Each tile keeps MR x NV vectors of C in registers: per k, NV vector loads + MR broadcasts +
// MR * NV FMAs.
#pragma once

#include <algorithm>
#include <cstdint>

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
};

template <int MR, int NV>
void gemm_tile(int K, const float* A, int64_t a_row, int64_t a_col, MatB B, float* C, int64_t ldc,
               bool accumulate) {
  vfloat acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(C + r * ldc + v * kLanes) : vfloat{};
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

constexpr int kGemmMR = 4;
constexpr int kGemmNV = 4;

inline void gemm(int M, int N, int K, const float* A, int64_t a_row, int64_t a_col, MatB B, float* C,
                 int64_t ldc, bool accumulate) {
  using Tile = void (*)(int, const float*, int64_t, int64_t, MatB, float*, int64_t, bool);
  static constexpr Tile kTiles[kGemmMR][kGemmNV] = {
      {gemm_tile<1, 1>, gemm_tile<1, 2>, gemm_tile<1, 3>, gemm_tile<1, 4>},
      {gemm_tile<2, 1>, gemm_tile<2, 2>, gemm_tile<2, 3>, gemm_tile<2, 4>},
      {gemm_tile<3, 1>, gemm_tile<3, 2>, gemm_tile<3, 3>, gemm_tile<3, 4>},
      {gemm_tile<4, 1>, gemm_tile<4, 2>, gemm_tile<4, 3>, gemm_tile<4, 4>}};
  for (int n0 = 0; n0 < N; n0 += kGemmNV * kLanes) {
    const int nv = std::min(kGemmNV, (N - n0) / kLanes);
    const MatB b{B.data + (n0 / kLanes) * B.vec_step, B.k_step, B.vec_step};
    for (int m0 = 0; m0 < M; m0 += kGemmMR) {
      const int mr = std::min(kGemmMR, M - m0);
      kTiles[mr - 1][nv - 1](K, A + m0 * a_row, a_row, a_col, b, C + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

}  // namespace flash_attention::cpu
