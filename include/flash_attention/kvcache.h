// flash_attention/kvcache.h — inference with a KV cache (no torch).
//
// FlashAttention-2's flash_attn_with_kvcache over raw pointers: one call optionally appends new keys and
// values to the cache (in place, after rotary), then attends q to the cache. Same attention semantics as
// flash_attention.h (scale, softcap, ALiBi, window / causal, GQA, lse = +inf for rows with no visible key),
// applied to each sequence's *effective* keys:
//
//   sk_cache[b] = cache_seqlens ? cache_seqlens[b] : capacity        rows valid before the append
//   leftpad[b]  = cache_leftpad ? cache_leftpad[b] : 0              rows [0, leftpad) are padding
//   keys of b   = cache rows [leftpad[b], sk_cache[b] + seqlen_new)  (the new rows land at sk_cache[b]...)
//   Sk[b]       = sk_cache[b] + seqlen_new - leftpad[b];  masks / ALiBi use key index j in [0, Sk[b])
//
// Cache layouts (D contiguous, other strides free):
//   contiguous: k_cache, v_cache (cache_batch, cache_seqlen, Hk, D); sequence b lives in cache row
//               cache_batch_idx ? cache_batch_idx[b] : b;  capacity = cache_seqlen
//   paged:      k_cache, v_cache (num_blocks = cache_batch, page_size = cache_seqlen, Hk, D), page_size % 16 == 0;
//               position p of sequence b is row p % page_size of page block_table[b][p / page_size];
//               capacity = max_blocks_per_seq * page_size. Pages past a sequence's end are never read.
//
// Queries: q / out (B, Sq, H, D) with softmax_lse (B, H, Sq); or varlen (cu_seqlens_q set):
//          q / out (total_q, H, D), softmax_lse (H, total_q), seqlen_q = max over sequences.
//
// Rotary (rotary_cos set): cos / sin (seqlen_rotary, rotary_dim / 2) in `dtype`, applied in fp32 and
// rounded to `dtype`, to the first rotary_dim dims of the new keys (position = cache position) and of q:
// query row i sits at position sk_cache[b] + i when causal or windowed, else at sk_cache[b] for every row.
// Interleaved (GPT-J): pairs (x[2t], x[2t+1]); otherwise (GPT-NeoX): pairs (x[t], x[t + rotary_dim / 2]).
//     x0' = x0 cos - x1 sin,   x1' = x0 sin + x1 cos   (cos / sin at index t of the position's row)
//
// Index checks: every cache_seqlens / cache_leftpad / cache_batch_idx / block_table entry a call uses and
// every rotary position is range-checked before anything is read or written (CPU: always; CUDA: when
// check_indices, at the cost of one stream synchronisation). The CUDA kernels never read or write out of
// bounds even with check_indices = false: out-of-range indices then give unspecified (finite) results.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flash_attention/flash_attention.h"

namespace flash_attention {

struct KVCacheParams {
  Device device = Device::kCPU;
  DType dtype = DType::kFloat16;  // of q, out, caches, new k/v and rotary cos/sin

  int batch = 0;
  int seqlen_q = 0;  // varlen: max over sequences
  int num_heads = 0;
  int num_heads_k = 0;
  int head_dim = 0;  // <= 256, multiple of 8
  int64_t total_q = 0;  // varlen only

  const void* q = nullptr;
  void* out = nullptr;
  float* softmax_lse = nullptr;  // required
  TensorStrides q_strides, out_strides;
  const int32_t* cu_seqlens_q = nullptr;  // (B + 1), varlen queries

  // Cache (modified in place when k_new / v_new are given).
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  TensorStrides k_cache_strides, v_cache_strides;  // batch = stride between cache rows / pages
  int cache_batch = 0;     // contiguous: cache rows; paged: num_blocks
  int cache_seqlen = 0;    // contiguous: rows per sequence; paged: page_size
  const int32_t* block_table = nullptr;  // (B, max_blocks_per_seq) => paged
  int64_t block_table_stride = 0;        // elements between rows of block_table
  int max_blocks_per_seq = 0;
  const int32_t* cache_batch_idx = nullptr;  // (B), contiguous caches only
  const int32_t* cache_seqlens = nullptr;    // (B); null => every sequence fills its capacity
  const int32_t* cache_leftpad = nullptr;    // (B)

  // New keys / values (B, seqlen_new, Hk, D), both or neither; require cache_seqlens.
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  TensorStrides k_new_strides, v_new_strides;
  int seqlen_new = 0;

  // Rotary embedding, both or neither.
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  int64_t rotary_cos_stride = 0;  // elements between rows
  int64_t rotary_sin_stride = 0;
  int seqlen_rotary = 0;
  int rotary_dim = 0;  // even, <= head_dim
  bool rotary_interleaved = true;

  // Attention options (as in ForwardParams).
  float softmax_scale = 0.f;
  bool causal = false;
  int window_left = -1;
  int window_right = -1;
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;  // (H) or (B, H) fp32
  int64_t alibi_batch_stride = 0;

  // Execution.
  int num_splits = 0;          // split the keys into this many parts (CUDA); 0 = heuristic
  bool check_indices = true;   // see "Index checks" above
  void* workspace = nullptr;   // CUDA scratch of kvcache_workspace_size() bytes; null = allocated per call
  std::size_t workspace_bytes = 0;
  void* stream = nullptr;      // cudaStream_t for kCUDA
  int num_threads = 0;         // CPU threads, 0 = OpenMP default

  bool is_paged() const { return block_table != nullptr; }
  bool is_varlen() const { return cu_seqlens_q != nullptr; }
  bool has_new_kv() const { return k_new != nullptr; }
  bool has_rotary() const { return rotary_cos != nullptr; }
  int64_t capacity() const {
    return is_paged() ? int64_t(max_blocks_per_seq) * cache_seqlen : int64_t(cache_seqlen);
  }
};

// Merges attention results computed over disjoint key sets (split-KV, context parallelism):
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * out_s.
// A part with lse_s = -inf contributes nothing; rows where every part is -inf give out = 0, lse = +inf.
//   out_partial (num_splits, B, Sq, H, D) fp32      lse_partial (num_splits, B, Sq, H) fp32
//   out (B, Sq, H, D) in out_dtype (fp16 / bf16 / fp32)   softmax_lse (B, H, Sq) fp32, may be null
struct CombineParams {
  Device device = Device::kCPU;
  DType out_dtype = DType::kFloat32;
  int num_splits = 0;
  int batch = 0;
  int seqlen = 0;
  int num_heads = 0;
  int head_dim = 0;

  const float* out_partial = nullptr;
  int64_t out_partial_split_stride = 0;
  TensorStrides out_partial_strides;
  const float* lse_partial = nullptr;
  int64_t lse_split_stride = 0, lse_batch_stride = 0, lse_row_stride = 0, lse_head_stride = 0;
  void* out = nullptr;
  TensorStrides out_strides;
  float* softmax_lse = nullptr;
  void* stream = nullptr;
};

// Shape / pointer checks (no data reads); kInvalidArgument names the offending field.
Status validate(const KVCacheParams& params);
Status validate(const CombineParams& params);

// Entry points: validate, check indices (see above), append, attend. Thread-safe; no global state.
Status kvcache_forward(KVCacheParams params);
Status combine(CombineParams params);

// Bytes of CUDA scratch kvcache_forward needs for these params (0 on the CPU).
std::size_t kvcache_workspace_size(const KVCacheParams& params);

}  // namespace flash_attention
