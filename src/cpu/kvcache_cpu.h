// Internal pieces of the KV-cache path shared by the public entry (kvcache_api.cpp), the CPU
// implementation (kvcache_cpu.cpp) and the CUDA door (cuda/decode/decode_api.h): host-side views of the
// index arrays, per-sequence lengths, and the index checks.
#pragma once

#include <cstdint>

#include "flash_attention/kvcache.h"

namespace flash_attention::kv {

// Host copies (or the host originals) of the int32 index arrays of a KVCacheParams.
struct HostIndex {
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cache_seqlens = nullptr;
  const int32_t* cache_leftpad = nullptr;
  const int32_t* cache_batch_idx = nullptr;
  const int32_t* block_table = nullptr;

  static HostIndex of(const KVCacheParams& p) {
    return {p.cu_seqlens_q, p.cache_seqlens, p.cache_leftpad, p.cache_batch_idx, p.block_table};
  }
};

// Lengths of one sequence (see the header comment of kvcache.h).
struct SeqInfo {
  int64_t sk_cache = 0;  // valid cache rows before the append
  int64_t leftpad = 0;
  int64_t sk = 0;        // effective keys: cache rows [leftpad, leftpad + sk)
  int64_t sq = 0;        // query rows
  int64_t q_start = 0;   // first query row (varlen: in the packed total; else 0)
  int32_t cache_row = 0; // contiguous caches: which cache row holds the sequence
};

SeqInfo seq_info(const KVCacheParams& p, const HostIndex& idx, int b);

// Range checks of every index a call will use (kvcache.h, "Index checks"). kInvalidArgument names the
// array and the entry.
Status check_indices(const KVCacheParams& p, const HostIndex& idx);

// Folds causal into the window (right = 0) and drops a left window that covers the whole capacity
// (a no-op for the mask). Called once by kvcache_forward before any backend runs.
void normalize(KVCacheParams& p);

// Position of query row i of a sequence, for rotary (FlashAttention-2's rule: per row when the call is
// causal or has a window narrower than the capacity, else every row at sk_cache). p is normalised.
inline int64_t q_rotary_position(const KVCacheParams& p, const SeqInfo& s, int64_t i) {
  const bool per_row = p.window_left >= 0 || (p.window_right >= 0 && p.window_right < p.capacity());
  return s.sk_cache + (per_row ? i : 0);
}

}  // namespace flash_attention::kv

namespace flash_attention::cpu {

// params validated, causal folded into the window, indices checked; host pointers.
Status kvcache_forward(const KVCacheParams& params);
Status combine(const CombineParams& params);

}  // namespace flash_attention::cpu
