// Host side of the sm90 backward: tile per head dim, workspace, TMA descriptors, the three launches.
// Included by the instantiation files.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "cuda/sm90/bwd_dispatch.h"
#include "cuda/sm90/bwd_kernel.h"
#include "cuda/sm90/fwd_launch.h"  // gmem_view

namespace flash_attention::sm90 {

// (head dim) -> tile: 64 query rows per step, 2 Q/dO stages; 128 keys per CTA (64 per consumer
// warpgroup) up to head dim 128, 64 keys shared by both warpgroups above (bwd_traits.h; D / 2 must be whole
// 64-column swizzle atoms of the MN-major dO / Q / K views, so 256 but not 192). 128 query
// rows at head dim 64 spill (S^T, dP^T, dK, dV: 192 accumulator registers).
template <int kHeadDim, class Element>
using BwdTile = BwdTraits<kHeadDim, 64, (kHeadDim <= 128 ? 128 : 64), 2, Element>;

inline Status bwd_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::CudaError(std::string("sm90 backward: ") + what + ": " + cudaGetErrorString(err));
}

inline BwdArgs make_bwd_args(const BackwardParams& p, int block_m) {
  BwdArgs a;
  a.batch = p.batch;
  a.seqlen_q = p.seqlen_q;
  a.seqlen_k = p.seqlen_k;
  a.num_heads = p.num_heads;
  a.heads_per_kv_head = p.num_heads / p.num_heads_k;
  a.head_dim = p.head_dim;
  a.m_blocks = (p.seqlen_q + block_m - 1) / block_m;
  a.out = p.out;
  a.dout = p.dout;
  a.out_row = p.out_strides.row, a.out_head = p.out_strides.head, a.out_batch = p.out_strides.batch;
  a.dout_row = p.dout_strides.row, a.dout_head = p.dout_strides.head, a.dout_batch = p.dout_strides.batch;
  a.lse = p.softmax_lse;
  a.dq = p.dq, a.dk = p.dk, a.dv = p.dv;
  a.dq_row = p.dq_strides.row, a.dq_head = p.dq_strides.head, a.dq_batch = p.dq_strides.batch;
  a.dk_row = p.dk_strides.row, a.dk_head = p.dk_strides.head, a.dk_batch = p.dk_strides.batch;
  a.dv_row = p.dv_strides.row, a.dv_head = p.dv_strides.head, a.dv_batch = p.dv_strides.batch;
  a.scale = p.softmax_scale;
  a.scale_log2 = p.softmax_scale * kLog2e;
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  return a;
}

// Workspace of one call, in floats: lse_log2 and dsum (`rows` each), then dq_accum, then the dq_turns
// ints when deterministic (see BwdArgs).
// `rows` is a multiple of 64, so every part stays 256-byte aligned.
struct BwdWorkspace {
  int64_t rows = 0;
  int64_t dq_floats = 0;
  int64_t turns = 0;  // deterministic only
  size_t bytes() const { return size_t(2 * rows + dq_floats) * sizeof(float) + size_t(turns) * sizeof(int); }
};

template <class Traits>
BwdWorkspace bwd_workspace(const BwdArgs& a, bool deterministic) {
  const int64_t tiles = int64_t(a.batch) * a.num_heads * a.m_blocks;
  return {tiles * Traits::kBlockM, tiles * Traits::kDqElems, deterministic ? tiles : 0};
}

template <class Traits>
typename Traits::Params bwd_params(const BackwardParams& p, const BwdArgs& a) {
  const int b = p.batch, h = p.num_heads, hk = p.num_heads_k, d = p.head_dim;
  return {make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Traits>(p.q, p.q_strides, p.seqlen_q, d, h, b),
                        take<0, 2>(typename Traits::SmemLayoutQ{}), Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Traits>(p.dout, p.dout_strides, p.seqlen_q, d, h, b),
                        take<0, 2>(typename Traits::SmemLayoutQ{}), Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Traits>(p.k, p.k_strides, p.seqlen_k, d, hk, b),
                        typename Traits::SmemLayoutK{}, Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{}, _1{}),
          make_tma_copy(SM90_TMA_LOAD{}, gmem_view<Traits>(p.v, p.v_strides, p.seqlen_k, d, hk, b),
                        typename Traits::SmemLayoutK{}, Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{}, _1{}),
          make_shape(int32_t(p.seqlen_q), int32_t(d), int32_t(h), int32_t(b)),
          make_shape(int32_t(p.seqlen_k), int32_t(d), int32_t(hk), int32_t(b)),
          a};
}

template <class Traits>
Status launch_bwd(const BackwardParams& p) {
  using Element = typename Traits::Element;
  constexpr int kD = Traits::kHeadDim, kM = Traits::kBlockM;
  const auto stream = static_cast<cudaStream_t>(p.stream);
  BwdArgs a = make_bwd_args(p, kM);
  const BwdWorkspace work = bwd_workspace<Traits>(a, p.deterministic);
  float* ws = nullptr;
  FA_RETURN_IF_ERROR(bwd_cuda(cudaMallocAsync(reinterpret_cast<void**>(&ws), work.bytes(), stream),
                              "workspace allocation"));
  a.lse_log2 = ws;
  a.dsum = ws + work.rows;
  a.dq_accum = ws + 2 * work.rows;
  a.dq_turns = work.turns > 0 ? reinterpret_cast<int*>(a.dq_accum + work.dq_floats) : nullptr;

  const int rows = a.m_blocks * kM;
  const dim3 prep_grid((rows + bwd_rows_per_cta<kD>() - 1) / bwd_rows_per_cta<kD>(), p.num_heads, p.batch);
  const dim3 main_grid((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.num_heads_k, p.batch);
  const dim3 dq_grid(a.m_blocks, p.num_heads, p.batch);
  auto main_kernel = bwd_main_kernel<Traits>;
  Status st = bwd_cuda(cudaFuncSetAttribute(main_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
                       "shared memory attribute");
  if (st.ok()) {
    bwd_prep_kernel<kD, kM, Element><<<prep_grid, kBwdRowThreads, 0, stream>>>(a);  // also zeroes dq_accum
    main_kernel<<<main_grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(bwd_params<Traits>(p, a));
    bwd_dq_kernel<Traits><<<dq_grid, Traits::kConsumerThreads, 0, stream>>>(a);
    st = bwd_cuda(cudaGetLastError(), "kernel launch");
  }
  const Status freed = bwd_cuda(cudaFreeAsync(ws, stream), "workspace free");
  return st.ok() ? freed : st;
}

}  // namespace flash_attention::sm90
