// Arguments of the split-KV attention kernel over a KV cache (plain device pointers, element strides).
//
// Work decomposition: query rows of one KV head are packed together (row r of a tile = query index
// r / G and head hk * G + r % G, G = H / Hk), so every K/V byte a CTA reads serves all query heads of its
// group. A CTA takes one row tile of one KV head and one of `num_splits` contiguous runs of keys:
// grid = (row_tiles * Hk, num_splits, B). With several splits, every CTA writes fp32 partials and the last
// CTA of a (batch, row tile, KV head) to finish merges them in split order, in the same launch
// (deterministic: the order does not depend on which CTA arrives last), or, on sm90, the splits form one
// cluster and merge through distributed shared memory. A CTA has kDecodeWarps warps, or on sm90
// kDecodeWarpsWide (few tiles: the same warps in flight with half the splits, so that they fit in one
// cluster) or kDecodeWarpsNarrow (many tiles: four CTAs per SM instead of three, the same warps in more
// slots).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "flash_attention/status.h"

namespace flash_attention::cuda::decode {

constexpr int kMaxClusterSplits = 8;  // the portable cluster size

constexpr int kDecodeRows = 16;      // packed query rows per head (the m of mma.m16n8k16)
constexpr int kDecodeWarps = 4;
constexpr int kDecodeWarpsWide = 8;  // the wide CTA (DecodeArgs::warps)
constexpr int kDecodeWarpsNarrow = 3;  // the narrow CTA (DecodeArgs::warps)
constexpr int kDecodeBlock = 16;     // keys per warp step
constexpr int kMaxSplits = 128;      // split-KV parts of one launch

struct DecodeArgs {
  // Queries (already rotated), dense (B, Sq, H, D) or varlen (total_q, H, D) via cu_seqlens_q; 16-byte
  // aligned rows (base pointer, and strides of 8 elements where the dimension has more than one index).
  const void* q = nullptr;
  int64_t q_batch = 0, q_row = 0, q_head = 0;
  const int32_t* cu_seqlens_q = nullptr;

  // Cache: rows addressed through block_table (paged) or cache_batch_idx / b (contiguous).
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_batch = 0, k_row = 0, k_head = 0;
  int64_t v_batch = 0, v_row = 0, v_head = 0;
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int page_size = 0;       // paged: rows per page; contiguous: cache_seqlen
  int max_blocks = 0;      // paged: columns of block_table
  int cache_batch = 0;     // pages (paged) or cache rows (contiguous), for bounds
  const int32_t* cache_batch_idx = nullptr;
  const int32_t* cache_seqlens = nullptr;  // null: capacity
  const int32_t* cache_leftpad = nullptr;
  int capacity = 0;
  int seqlen_new = 0;      // rows appended before this kernel runs

  int batch = 0, seqlen_q = 0, heads = 0, heads_k = 0, head_dim = 0;
  int64_t total_rows = 0;  // B * Sq (dense) or total_q (varlen)

  float scale = 0.f;       // softmax scale
  float softcap = 0.f;
  const float* alibi = nullptr;
  int64_t alibi_batch_stride = 0;
  int window_left = -1, window_right = -1;

  int num_splits = 1;      // <= kMaxSplits
  // Final output. out rows: dense b * out_batch + i * out_row; varlen (q_start + i) * out_row.
  void* out = nullptr;
  int64_t out_batch = 0, out_row = 0, out_head = 0;
  float* lse = nullptr;    // dense (B, H, Sq); varlen (H, total_q)
  // num_splits > 1: partials (splits, total_rows, H, D) and (splits, total_rows, H) fp32, and one arrival
  // counter per CTA of a split (B * gridDim.x int32), zero before the launch.
  float* out_accum = nullptr;
  float* lse_accum = nullptr;
  int32_t* counters = nullptr;
  // sm90, num_splits <= kMaxClusterSplits: the splits of one (b, tile) run as one thread block cluster and
  // merge through distributed shared memory (no partials, no counters).
  bool cluster = false;
  // Warps per CTA: kDecodeWarps, or (sm90 only) kDecodeWarpsWide (DecodeKernel::kHasWide) or
  // kDecodeWarpsNarrow (kHasNarrow).
  int warps = kDecodeWarps;
  // sm90: load K / V blocks by 2-D TMA (one tensor copy per K / V block, decode_kernel.cuh "TMA tiles") where
  // the kernel can (DecodeKernel::run: head_dim == the kernel's, a multiple of 64; paged caches without left
  // padding; the driver encodes the tensor maps); elsewhere the cp.async path.
  bool tma = false;
};

inline int row_tiles(const DecodeArgs& a) {
  return (a.seqlen_q * (a.heads / a.heads_k) + kDecodeRows - 1) / kDecodeRows;
}
inline int ctas_per_split(const DecodeArgs& a) { return row_tiles(a) * a.heads_k; }

// The attention kernel compiled for head dim kHeadDim (>= args.head_dim) and Element.
template <int kHeadDim, typename Element>
struct DecodeKernel {
  // Whether the wide CTA (kDecodeWarpsWide warps) is built: its shared memory (hdim 128: 141 KB) fits an sm90
  // SM up to hdim 192; built up to 128 (compile time), for sm90 only (elsewhere it traps).
  static constexpr bool kHasWide = kHeadDim <= 128;
  // Whether the narrow CTA (kDecodeWarpsNarrow warps) is built: four fit per SM where three 4-warp CTAs do
  // (hdim 128, TMA tiles: 54 KB of shared memory, 168 registers), the same warps in 4 / 3 as many slots;
  // head dims up to 128 that TMA tiles serve, for sm90 only (elsewhere it traps).
  static constexpr bool kHasNarrow = kHeadDim <= 128 && kHeadDim % 64 == 0;
  static Status run(const DecodeArgs& args, cudaStream_t stream);
  // Dynamic shared memory of a CTA of `warps` warps (kDecodeWarps, or kDecodeWarpsWide when kHasWide).
  static int smem_bytes(int warps);
  // Resident CTAs of `warps` warps per multiprocessor of the current device (0 if the query fails); the
  // narrow CTA's with TMA tiles, the only K / V path the host picks it for.
  static int ctas_per_sm(int warps = kDecodeWarps);
  // The compute capability (major) the current device's code for these kernels was compiled for: 9 for
  // sm90 code, 8 where an sm90 device runs sm80 code (a build without sm90: its wide / TMA kernels are
  // stubs); 0 if the query fails.
  static int arch_major();
};

}  // namespace flash_attention::cuda::decode
