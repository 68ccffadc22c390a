// Host side of the sm80 backward: tile choice per head dim, workspace, the three launches.
// Included only by the generated instantiation files.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "cuda/sm80/bwd_api.h"
#include "cuda/sm80/bwd_kernel.h"

namespace flash_attention::sm80 {

// Tile per head dim (8 warps): block_m, block_n, warps along M for S/dP, along N for dK/dV, along M
// for dQ, Q pipeline stages. Shared memory stays <= 164 KB so the kernels also run on A100.
template <int kHeadDim, class Element> struct BwdTile;
template <class E> struct BwdTile<32, E> { using T = BwdTraits<E, 32, 64, 128, 8, 2, 4, 4, 2>; };
template <class E> struct BwdTile<64, E> { using T = BwdTraits<E, 64, 64, 128, 8, 2, 4, 4, 2>; };
template <class E> struct BwdTile<96, E> { using T = BwdTraits<E, 96, 64, 128, 8, 2, 4, 4, 2>; };
template <class E> struct BwdTile<128, E> { using T = BwdTraits<E, 128, 64, 128, 8, 2, 4, 2, 2>; };
template <class E> struct BwdTile<192, E> { using T = BwdTraits<E, 192, 64, 64, 8, 4, 2, 2, 2>; };
template <class E> struct BwdTile<256, E> { using T = BwdTraits<E, 256, 64, 64, 8, 4, 2, 2, 1>; };

// The tile used where the GPU allows more shared memory per block than A100's 164 KB (H100/H200: 227 KB):
// head dim 256 then double-buffers Q (176 KB), so the next Q block loads while this one computes
// (H200, bf16 fwd+bwd: +4-7 % dense, -6..+4 % causal, benchmarks/NOTES.md).
template <int kHeadDim, class Element> struct BwdTileWide { using T = typename BwdTile<kHeadDim, Element>::T; };
template <class E> struct BwdTileWide<256, E> { using T = BwdTraits<E, 256, 64, 64, 8, 4, 2, 2, 2>; };

inline Status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::CudaError(std::string("backward: ") + what + ": " + cudaGetErrorString(err));
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Deterministic mode: enough dQ splits to fill the GPU once, never more than the key blocks.
inline int deterministic_splits(const BwdKernelParams& p, int block_n, int num_sms) {
  const int num_n = (p.seqlen_k + block_n - 1) / block_n;
  const int ctas_per_split = p.batch * p.num_heads_k;
  return std::max(1, std::min(num_n, (num_sms + ctas_per_split - 1) / ctas_per_split));
}

template <class Traits, bool kDropout, bool kSoftcap>
Status launch_main(const BwdKernelParams& p, cudaStream_t stream) {
  auto kernel = bwd_main_kernel<Traits, kDropout, kSoftcap>;
  constexpr int kSmem = Traits::kSmemBytes;
  FA_RETURN_IF_ERROR(cuda_status(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
      "cudaFuncSetAttribute"));
  const int grid_x = p.deterministic ? p.num_splits
                                     : (p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  kernel<<<dim3(grid_x, p.batch, p.num_heads_k), Traits::kNThreads, kSmem, stream>>>(p);
  return cuda_status(cudaGetLastError(), "main kernel launch");
}

template <class Traits, bool kDropout>
Status run_bwd_tile(BwdKernelParams p, BwdWorkspace workspace, cudaStream_t stream, int num_sms) {
  constexpr int kHeadDim = Traits::kHeadDim;
  using Element = typename Traits::Element;
  // Workspace: dsum (lse layout, rounded to 16 bytes) | dq_accum (splits, H, q_rows, kHeadDim).
  p.q_rows = p.cu_seqlens_q ? p.total_q : int64_t(p.batch) * p.seqlen_q;
  p.num_splits = p.deterministic ? deterministic_splits(p, Traits::kBlockN, num_sms) : 1;
  p.dq_accum_split_stride = int64_t(p.num_heads) * p.q_rows * kHeadDim;
  const int64_t dsum_elems = round_up(int64_t(p.num_heads) * p.q_rows, 4);
  const size_t dq_bytes = sizeof(float) * p.num_splits * p.dq_accum_split_stride;
  const size_t bytes = sizeof(float) * dsum_elems + dq_bytes;
  void* base = workspace.ptr;
  if (base == nullptr) {
    FA_RETURN_IF_ERROR(cuda_status(cudaMallocAsync(&base, bytes, stream), "workspace allocation"));
  } else if (workspace.bytes < bytes) {
    return Status::InvalidArgument("backward: workspace too small");
  }
  p.dsum = static_cast<float*>(base);
  p.dq_accum = p.dsum + dsum_elems;

  Status status = cuda_status(cudaMemsetAsync(p.dq_accum, 0, dq_bytes, stream), "memset");
  constexpr int kRowsPerCta = rows_per_row_cta<kHeadDim>();
  const dim3 row_grid((p.seqlen_q + kRowsPerCta - 1) / kRowsPerCta, p.batch, p.num_heads);
  if (status.ok()) {
    bwd_dsum_kernel<kHeadDim, Element><<<row_grid, kRowKernelThreads, 0, stream>>>(p);
    status = cuda_status(cudaGetLastError(), "dsum kernel launch");
  }
  if (status.ok()) {
    status = p.softcap > 0.f ? launch_main<Traits, kDropout, true>(p, stream)
                             : launch_main<Traits, kDropout, false>(p, stream);
  }
  if (status.ok()) {
    bwd_dq_kernel<kHeadDim, Element><<<row_grid, kRowKernelThreads, 0, stream>>>(p);
    status = cuda_status(cudaGetLastError(), "dq kernel launch");
  }
  if (workspace.ptr == nullptr) {
    const Status freed = cuda_status(cudaFreeAsync(base, stream), "workspace free");
    if (status.ok()) status = freed;
  }
  return status;
}

template <int kHeadDim, class Element, bool kDropout>
Status run_bwd(BwdKernelParams p, BwdWorkspace workspace, void* stream_ptr) {
  using Traits = typename BwdTile<kHeadDim, Element>::T;
  using Wide = typename BwdTileWide<kHeadDim, Element>::T;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int device = 0, num_sms = 0, smem_optin = 0;
  FA_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&device), "cudaGetDevice"));
  FA_RETURN_IF_ERROR(cuda_status(
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), "attribute"));
  FA_RETURN_IF_ERROR(cuda_status(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
      "attribute"));
  if constexpr (!std::is_same_v<Traits, Wide>) {
    if (smem_optin >= Wide::kSmemBytes) return run_bwd_tile<Wide, kDropout>(p, workspace, stream, num_sms);
  }
  if (smem_optin < Traits::kSmemBytes) {
    return Status::NotSupported("backward: head_dim " + std::to_string(kHeadDim) + " needs " +
                                std::to_string(Traits::kSmemBytes) +
                                " bytes of shared memory per block; this GPU allows " +
                                std::to_string(smem_optin));
  }
  return run_bwd_tile<Traits, kDropout>(p, workspace, stream, num_sms);
}

}  // namespace flash_attention::sm80

// Explicit instantiation, one per generated file.
#define FA_SM80_BWD_INSTANTIATE(HDIM, ELEMENT, DROPOUT)                                          \
  template ::flash_attention::Status                                                            \
  flash_attention::sm80::run_bwd<HDIM, ELEMENT, DROPOUT>(flash_attention::sm80::BwdKernelParams, \
                                                          flash_attention::sm80::BwdWorkspace, void*);
