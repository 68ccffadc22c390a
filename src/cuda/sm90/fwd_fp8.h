// FP8 (e4m3) pieces of the sm90 forward: P from fp32 accumulators to the e4m3 A operand of the P V
// wgmma, and the V^T copy that operand pairs with.
//
// An e4m3 wgmma reads both operands K-major, so O = P V needs V^T (keys contiguous). A small kernel
// writes V^T into a workspace before the attention kernel: (batch, heads_k, head_dim, keys padded to
// 32), zero past seqlen_k (its cost is in NOTES.md).
//
// P stays in registers. Per 32 keys a thread's fp32 accumulator holds columns {2t, 2t+1} + 8j
// (t = lane % 4, j = 0..3) of rows r and r + 8, while the e4m3 A fragment holds k = 4t..4t+3 of row r,
// the same of row r + 8, then k + 16 of both. Rather than shuffling values across the quad, the keys
// of each group of 32 are renumbered: the A operand's k-th key is key fp8_key_of(k) of the group, so a
// thread's own values are exactly what it must supply (a byte reorder in registers), and the V^T copy
// stores its keys in the same order. P V sums over keys, so the order cancels out.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "flash_attention/flash_attention.h"

namespace flash_attention::sm90 {

using namespace cute;

// The key (0..31 within its group of 32) the A operand's k-th position holds:
// k = 16h + 4t + w  ->  16h + 8 (w / 2) + 2t + w % 2.
CUTE_HOST_DEVICE constexpr int fp8_key_of(int k) {
  return (k / 16) * 16 + ((k % 4) / 2) * 8 + ((k % 16) / 4) * 2 + k % 2;
}

// Register fragment of P as the e4m3 A operand for a warpgroup tile of kBlockN keys: per 32 keys
// ((4 keys, rows r / r + 8, key halves), 1 row block, kBlockN / 32 k-blocks), as wgmma reads it.
template <int kBlockN>
CUTE_DEVICE auto make_fp8_p_fragment() {
  return make_tensor<cutlass::float_e4m3_t>(Shape<Shape<_4, _2, _2>, _1, Int<kBlockN / 32>>{});
}

// accumulator S ((2, 2, N/8), 1, 1) fp32 -> P e4m3 fragment of make_fp8_p_fragment, keys renumbered as
// fp8_key_of says. Accumulator value (column block j, row half h, column c) of a group of 32 goes to
// byte 8 (j / 2) + 4h + 2 (j % 2) + c of that group's 16 bytes.
template <class TS, class TP>
CUTE_DEVICE void convert_p_fp8(TS const& s, TP& p) {
  constexpr int kGroups = decltype(size(s))::value / 16;
  const float* src = s.data();
  auto* dst = reinterpret_cast<cutlass::Array<cutlass::float_e4m3_t, 16>*>(p.data());
  cutlass::NumericArrayConverter<cutlass::float_e4m3_t, float, 16> conv;
  CUTE_UNROLL
  for (int g = 0; g < kGroups; ++g) {
    cutlass::Array<float, 16> v;
    CUTE_UNROLL
    for (int i = 0; i < 16; ++i) {
      const int j = i / 4, h = (i / 2) % 2, c = i % 2;
      v[8 * (j / 2) + 4 * h + 2 * (j % 2) + c] = src[16 * g + i];
    }
    dst[g] = conv(v);
  }
}

// V (B, Sk, Hk, D) e4m3 -> V^T (B, Hk, D, sk_pad), sk_pad % 32 == 0, keys of each group of 32 in
// fp8_key_of order, zero past Sk. A CTA moves tiles of kTile keys x kTile head-dim columns through
// shared memory with 16-byte loads and stores: grid (batch * heads_k, head-dim tiles, key tiles, strided).
struct VtArgs {
  const uint8_t* v;
  int64_t batch_stride, row_stride, head_stride;  // of V, in elements (= bytes)
  uint8_t* vt;
  int seqlen_k, sk_pad, heads_k, head_dim;
};

template <int kTile = 64>
__global__ void __launch_bounds__(256) transpose_v_fp8_kernel(const VtArgs a) {
  static_assert(kTile * kTile == 256 * 16, "one 16-byte load and store per thread");
  constexpr int kChunks = kTile / 16;  // 16-byte chunks per tile row
  __shared__ alignas(16) uint8_t tile[kTile][kTile + 16];
  const int b = blockIdx.x / a.heads_k, h = blockIdx.x % a.heads_k, d0 = blockIdx.y * kTile;
  const uint8_t* v = a.v + b * a.batch_stride + h * a.head_stride + d0;
  uint8_t* vt = a.vt + ((int64_t(b) * a.heads_k + h) * a.head_dim + d0) * a.sk_pad;
  const int row = threadIdx.x / kChunks, col = threadIdx.x % kChunks * 16;
  for (int key0 = blockIdx.z * kTile; key0 < a.sk_pad; key0 += gridDim.z * kTile) {
    uint4 val = make_uint4(0, 0, 0, 0);
    if (key0 + row < a.seqlen_k && d0 + col < a.head_dim) {
      val = *reinterpret_cast<const uint4*>(v + int64_t(key0 + row) * a.row_stride + col);
    }
    *reinterpret_cast<uint4*>(&tile[row][col]) = val;
    __syncthreads();
    // Thread (row, col) now writes head-dim column `row`, keys key0 + col .. + 15.
    if (d0 + row < a.head_dim && key0 + col < a.sk_pad) {
      alignas(16) uint8_t out[16];
      CUTE_UNROLL
      for (int i = 0; i < 16; ++i) {
        const int key = col + i;
        out[i] = tile[key / 32 * 32 + fp8_key_of(key % 32)][row];
      }
      *reinterpret_cast<uint4*>(vt + int64_t(row) * a.sk_pad + key0 + col) = *reinterpret_cast<const uint4*>(out);
    }
    __syncthreads();
  }
}

inline int64_t fp8_vt_keys(int seqlen_k) { return (int64_t(seqlen_k) + 31) / 32 * 32; }

inline size_t fp8_vt_bytes(const ForwardParams& p) {
  return size_t(p.batch) * p.num_heads_k * p.head_dim * fp8_vt_keys(p.seqlen_k);
}

// Writes V^T of p.v into `vt` (fp8_vt_bytes(p) bytes) on p.stream. Dense (non-varlen) calls only.
template <int kTile = 64>
Status transpose_v_fp8(const ForwardParams& p, void* vt) {
  VtArgs a{static_cast<const uint8_t*>(p.v), p.v_strides.batch, p.v_strides.row, p.v_strides.head,
           static_cast<uint8_t*>(vt), p.seqlen_k, int(fp8_vt_keys(p.seqlen_k)), p.num_heads_k, p.head_dim};
  const int64_t key_tiles = (a.sk_pad + kTile - 1) / kTile;
  const dim3 grid(unsigned(p.batch * p.num_heads_k), unsigned((p.head_dim + kTile - 1) / kTile),
                  unsigned(key_tiles < 65535 ? key_tiles : 65535));
  transpose_v_fp8_kernel<kTile><<<grid, 256, 0, static_cast<cudaStream_t>(p.stream)>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::CudaError(std::string("sm90 fp8: V transpose launch failed: ") + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace flash_attention::sm90
