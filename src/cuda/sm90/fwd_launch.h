// Host side of the sm90 forward: TMA descriptors, grid, launch. Included by the instantiation files.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <string>
#include <type_traits>

#include "cuda/sm90/fwd_dispatch.h"
#include "cuda/sm90/fwd_kernel.h"
#include "flash_attention/flash_attention.h"

namespace flash_attention::sm90 {

// Strides of a size-1 mode never matter; give them a TMA-legal value: 16 bytes. (A fixed 8 elements
// was 16 bytes for 16-bit types but 8 for e4m3, and the FP8 maps of Sq = 1, Sk = 1, heads_k = 1 or
// batch = 1 failed to encode.)
template <class Element>
int64_t tma_stride(int64_t stride, int64_t extent) {
  return extent <= 1 ? int64_t(16 / sizeof(Element)) : stride;
}

// A (rows, head_dim, heads, batch) tensor as a TMA map sees it (Element const for inputs).
template <class Element>
auto tma_tensor(Element* ptr, const TensorStrides& st, int64_t rows, int head_dim, int heads, int batch) {
  using E = std::remove_const_t<Element>;
  auto shape = make_shape(int32_t(std::max<int64_t>(rows, 1)), int32_t(head_dim), int32_t(heads),
                          int32_t(batch));
  auto stride = make_stride(tma_stride<E>(st.row, rows), _1{}, tma_stride<E>(st.head, heads),
                            tma_stride<E>(st.batch, batch));
  return make_tensor(make_gmem_ptr(ptr), shape, stride);
}

template <class Traits>
typename Traits::GmemTensor gmem_view(const void* ptr, const TensorStrides& st, int64_t rows,
                                      int head_dim, int heads, int batch) {
  return tma_tensor(static_cast<typename Traits::Element const*>(ptr), st, rows, head_dim, heads, batch);
}

// CuTe's make_tma_copy does not report a failed cuTensorMapEncodeTiled: it prints the descriptor to
// stderr and returns it zero-filled, and a kernel launched with it faults (the FP8 illegal instruction of
// issue #5). The sm90 door (sm90_api.cu) already refuses the pointers and strides TMA cannot take, so a
// refusal here means a view of ours is wrong; each descriptor is checked before the launch.
// A descriptor left all zero is one the driver refused to encode.
template <class Tma>
bool tma_encoded(const Tma& tma) {
  const auto* words = reinterpret_cast<const uint64_t*>(tma.get_tma_descriptor());
  constexpr int kWords = int(sizeof(TmaDescriptor) / sizeof(uint64_t));
  return std::any_of(words, words + kWords, [](uint64_t w) { return w != 0; });
}

inline FwdArgs make_fwd_args(const ForwardParams& p) {
  FwdArgs a;
  a.seqlen_q = p.seqlen_q;
  a.seqlen_k = p.seqlen_k;
  a.num_heads = p.num_heads;
  a.heads_per_kv_head = p.num_heads / p.num_heads_k;
  a.head_dim = p.head_dim;
  a.cu_seqlens_q = p.cu_seqlens_q;
  a.cu_seqlens_k = p.cu_seqlens_k;
  a.out = p.out;
  a.out_row = p.out_strides.row;
  a.out_head = p.out_strides.head;
  a.out_batch = p.out_strides.batch;
  a.lse = p.softmax_lse;
  a.total_q = p.total_q;
  const float log2e = 1.4426950408889634f;
  if (p.softcap > 0.f) {
    a.softcap_pre = p.softmax_scale / p.softcap;
    a.scale_log2 = p.softcap * log2e;
  } else {
    a.scale_log2 = p.softmax_scale * log2e;
  }
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  a.q_descale = p.q_descale;
  a.k_descale = p.k_descale;
  a.v_descale = p.v_descale;
  a.batch = p.batch;
  if (const char* env = std::getenv("FLASH_ATTENTION_SM90_FWD")) {
    a.features = unsigned(std::strtoul(env, nullptr, 0));
  }
  return a;
}

// Fills the persistent schedule of `a` for tiles of block_m rows; returns the grid size (0: no work).
inline Status schedule(const ForwardParams& p, int block_m, FwdArgs& a, int* grid) {
  int device = 0, sms = 0, l2_bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device);
  if (err != cudaSuccess) return Status::CudaError(std::string("sm90: device query: ") + cudaGetErrorString(err));
  const int64_t head_pairs = int64_t(p.num_heads) * p.batch;
  const int64_t tiles = int64_t((p.seqlen_q + block_m - 1) / block_m) * head_pairs;
  if (tiles > INT32_MAX) return Status::NotSupported("sm90: more than 2^31 tiles");
  a.m_blocks = (p.seqlen_q + block_m - 1) / block_m;
  a.num_tiles = int(tiles);
  // Dense: one (batch, head) per section, so the query blocks sharing a head's K/V run together.
  // Causal / local: tile costs fall with the query block, heaviest first. Sections of as many heads as
  // fit half the L2 keep K/V reuse in the L2 (essential at short sequences: at S = 1k with 256 heads,
  // streaming every head's K/V per query block would be HBM-bound). With long sequences that is only
  // 1-3 heads, and each round of the snake order then spans nearly every cost level and balances
  // badly; there all (batch, head) pairs share one section (costs fall monotonically, which the snake
  // balances), and the L2 still serves: the tiles of a round start at neighbouring diagonals and walk
  // the keys downwards together. H200, bf16, hdim 128, causal: 16k 574 -> 670 TFLOP/s with one
  // section; 1k 381 -> 327 with one section (hence the L2 sections there).
  const bool local = p.window_left >= 0 || p.window_right >= 0;
  const int64_t kv_bytes = std::max<int64_t>(1, int64_t(p.seqlen_k) * p.head_dim * 2 * int64_t(dtype_size(p.dtype)));
  const int64_t l2_heads = std::clamp<int64_t>(l2_bytes / 2 / kv_bytes, 1, std::max<int64_t>(head_pairs, 1));
  a.heads_per_section = !local ? 1 : int(l2_heads < 4 ? std::min<int64_t>(head_pairs, INT32_MAX) : l2_heads);
  *grid = int(std::min<int64_t>(tiles, sms));
  return Status::Ok();
}

// V as TMA reads it, with its shape: V itself (16-bit types), or for FP8 the V^T copy at `vt`
// (see fwd_fp8.h), a (head_dim, keys, heads_k, batch) tensor with unit key stride.
template <class Traits>
struct VSource {
  typename Traits::GmemTensor tensor;
  typename Traits::GmemShape shape;
};

// Tiles of unequal cost (causal / local) and more of them than CTAs: the dynamic schedule where it measured
// faster than the static snake (H200, bf16, B * S = 16k, hidden 2048, causal, same run; benchmarks/results/
// h200_fwd_dynamic_ab.csv): hdim 256 at 1k / 2k keys 378 -> 412 / 445 -> 487 TFLOP/s (few, 2-13-block
// tiles per CTA balance badly in a fixed order); hdim 256 at 4k-16k -3 to +1 %, hdim 64 / 128 within
// -2 to +3 %, so those keep the static order. kFwdDynamicAlways: every causal / local / varlen call.
inline bool use_dynamic_tiles(const ForwardParams& p, const FwdArgs& a, int grid) {
  const bool uneven = p.is_varlen() || p.window_left >= 0 || p.window_right >= 0;
  if (!uneven || a.num_tiles <= grid) return false;
  if (a.has(kFwdDynamicAlways)) return true;
  return a.has(kFwdDynamicTiles) && !p.is_varlen() && p.head_dim > 128 && p.seqlen_k <= 2048;
}

template <class Traits>
Status launch_kernel(const ForwardParams& p, const VSource<Traits>& v) {
  using Params = typename Traits::Params;
  const bool varlen = p.is_varlen();
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q;
  const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
  const int batch = varlen ? 1 : p.batch;
  FwdArgs args = make_fwd_args(p);
  int grid = 0;
  FA_RETURN_IF_ERROR(schedule(p, Traits::kBlockM, args, &grid));
  if (grid == 0) return Status::Ok();
  const auto q = gmem_view<Traits>(p.q, p.q_strides, rows_q, p.head_dim, p.num_heads, batch);
  const auto k = gmem_view<Traits>(p.k, p.k_strides, rows_k, p.head_dim, p.num_heads_k, batch);

  Params params{
      make_tma_copy(SM90_TMA_LOAD{}, q, typename Traits::SmemLayoutQ{}, select<0, 2>(typename Traits::TileQK{}), _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, k, take<0, 2>(typename Traits::SmemLayoutKV{}),
                    select<1, 2>(typename Traits::TileQK{}), _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, v.tensor, take<0, 2>(typename Traits::SmemLayoutVLoad{}),
                    typename Traits::TileV{}, _1{}),
      make_tma_copy(SM90_TMA_STORE{},
                    tma_tensor(static_cast<typename Traits::ElementOut*>(p.out), p.out_strides, rows_q, p.head_dim,
                               p.num_heads, batch),
                    typename Traits::SmemLayoutOWG{}, select<0, 1>(typename Traits::TilePVWG{}), _1{}),
      make_shape(int32_t(std::max<int64_t>(rows_q, 1)), int32_t(p.head_dim), int32_t(p.num_heads), int32_t(batch)),
      make_shape(int32_t(std::max<int64_t>(rows_k, 1)), int32_t(p.head_dim), int32_t(p.num_heads_k), int32_t(batch)),
      v.shape,
      args};
  // A map over no rows (varlen with total_q or total_k = 0, maybe a null pointer) is never read.
  const bool q_read = rows_q > 0, kv_read = rows_k > 0;
  const char* refused = q_read && !tma_encoded(params.tma_q)    ? "q"
                        : kv_read && !tma_encoded(params.tma_k) ? "k"
                        : kv_read && !tma_encoded(params.tma_v) ? (Traits::kFp8 ? "the V^T workspace" : "v")
                        : q_read && !tma_encoded(params.tma_o)  ? "out"
                                                                : nullptr;
  if (refused != nullptr) {
    return Status::Internal(std::string("sm90 forward: cuTensorMapEncodeTiled refused the TMA map of ") + refused +
                            "; the kernel was not launched");
  }

  // The dynamic schedule, with its counter zeroed in a stream-ordered 4-byte workspace.
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  cudaError_t err = cudaSuccess;
  if (use_dynamic_tiles(p, args, grid)) {
    void* counter = nullptr;
    err = cudaMallocAsync(&counter, sizeof(int), stream);
    if (err == cudaSuccess) {
      params.args.tile_counter = static_cast<int*>(counter);
      err = cudaMemsetAsync(counter, 0, sizeof(int), stream);
      if (err != cudaSuccess) cudaFreeAsync(counter, stream);
    }
    if (err != cudaSuccess) {
      return Status::CudaError(std::string("sm90 forward: tile counter: ") + cudaGetErrorString(err));
    }
  }
  auto kernel = fwd_kernel<Traits>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err == cudaSuccess) {
    kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params);
    err = cudaGetLastError();
  }
  if (params.args.tile_counter != nullptr) {
    const cudaError_t freed = cudaFreeAsync(params.args.tile_counter, stream);
    if (err == cudaSuccess) err = freed;
  }
  if (err != cudaSuccess) {
    return Status::CudaError(std::string("sm90 forward launch failed: ") + cudaGetErrorString(err));
  }
  return Status::Ok();
}

// FP8: V^T into a stream-ordered workspace, then the kernel. Dense (non-varlen) calls only.
template <class Traits>
Status launch_fwd_fp8(const ForwardParams& p) {
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  void* vt = nullptr;
  cudaError_t err = cudaMallocAsync(&vt, fp8_vt_bytes(p), stream);
  if (err != cudaSuccess) return Status::CudaError(std::string("sm90 fp8: allocating V^T: ") + cudaGetErrorString(err));
  const int64_t keys = fp8_vt_keys(p.seqlen_k);
  auto shape = make_shape(int32_t(p.head_dim), int32_t(keys), int32_t(p.num_heads_k), int32_t(p.batch));
  auto stride = make_stride(keys, _1{}, int64_t(p.head_dim) * keys, int64_t(p.num_heads_k) * p.head_dim * keys);
  const VSource<Traits> v{make_tensor(make_gmem_ptr(static_cast<typename Traits::Element const*>(vt)), shape, stride),
                          shape};
  Status st = transpose_v_fp8(p, vt);
  if (st.ok()) st = launch_kernel<Traits>(p, v);
  err = cudaFreeAsync(vt, stream);
  if (st.ok() && err != cudaSuccess) st = Status::CudaError(std::string("sm90 fp8: freeing V^T: ") + cudaGetErrorString(err));
  return st;
}

template <class Traits>
Status launch_fwd(const ForwardParams& p) {
  if constexpr (Traits::kFp8) {
    return launch_fwd_fp8<Traits>(p);
  } else {
    const bool varlen = p.is_varlen();
    const int64_t rows_k = varlen ? p.total_k : p.seqlen_k;
    const int batch = varlen ? 1 : p.batch;
    const VSource<Traits> v{gmem_view<Traits>(p.v, p.v_strides, rows_k, p.head_dim, p.num_heads_k, batch),
                            make_shape(int32_t(std::max<int64_t>(rows_k, 1)), int32_t(p.head_dim),
                                       int32_t(p.num_heads_k), int32_t(batch))};
    return launch_kernel<Traits>(p, v);
  }
}

constexpr FwdTilePair tiles_for(int head_dim, bool fp8) {
  for (const FwdTilePair& t : fwd_tile_table(fp8)) {
    if (t.head_dim_matches(head_dim)) return t;
  }
  return *fwd_tile_table(fp8).begin();
}

// Launches the kernel built for `tile` (one of the two tiles of kHeadDim in kFwdTiles).
template <int kHeadDim, class Element>
Status launch_fwd_tile(const ForwardParams& p, const FwdTile& tile) {
  constexpr bool kFp8 = sizeof(Element) == 1;
  constexpr FwdTile kDense = tiles_for(kHeadDim, kFp8).dense;
  constexpr FwdTile kLocal = tiles_for(kHeadDim, kFp8).local;
  static_assert(kDense.head_dim == kHeadDim, "no tile for this head dim in kFwdTiles / kFwdTilesFp8");
  if (tile == kDense) {
    return launch_fwd<FwdTraits<kHeadDim, kDense.block_m, kDense.block_n, kDense.stages, Element>>(p);
  }
  if constexpr (!(kLocal == kDense)) {
    if (tile == kLocal) {
      return launch_fwd<FwdTraits<kHeadDim, kLocal.block_m, kLocal.block_n, kLocal.stages, Element>>(p);
    }
  }
  return Status::NotSupported("sm90: this tile is not built for head dim " + std::to_string(kHeadDim));
}

}  // namespace flash_attention::sm90
