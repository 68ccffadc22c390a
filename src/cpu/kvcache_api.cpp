// Public entry points of the KV-cache path: validation, index checks, routing to the CPU implementation or
// the CUDA kernels.
#include <algorithm>
#include <cmath>
#include <string>

#include "cpu/kvcache_cpu.h"
#include "flash_attention/kvcache.h"
#ifdef FLASH_ATTENTION_WITH_CUDA
#include "cuda/decode/decode_api.h"
#endif

namespace flash_attention {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 256;

Status invalid(const std::string& field, const std::string& what) {
  return Status::InvalidArgument(field + " " + what);
}
std::string got(int64_t v) { return " (got " + std::to_string(v) + ")"; }
std::string num(int64_t v) { return std::to_string(v); }

Status require(bool ok, const std::string& field, const std::string& what) {
  return ok ? Status::Ok() : invalid(field, what);
}

Status check_device_dtype(Device device, DType dtype, const char* dtype_field) {
  FA_RETURN_IF_ERROR(require(device == Device::kCPU || device == Device::kCUDA, "device", "is not a known device"));
  return require(dtype == DType::kFloat16 || dtype == DType::kBFloat16 || dtype == DType::kFloat32,
                 dtype_field, "must be float16, bfloat16 or float32");
}

Status check_query(const KVCacheParams& p) {
  FA_RETURN_IF_ERROR(require(p.batch >= 1, "batch", "must be >= 1" + got(p.batch)));
  FA_RETURN_IF_ERROR(require(p.seqlen_q >= 1, "seqlen_q", "must be >= 1" + got(p.seqlen_q)));
  FA_RETURN_IF_ERROR(require(p.num_heads >= 1, "num_heads", "must be >= 1" + got(p.num_heads)));
  FA_RETURN_IF_ERROR(require(p.num_heads_k >= 1, "num_heads_k", "must be >= 1" + got(p.num_heads_k)));
  FA_RETURN_IF_ERROR(require(p.num_heads % p.num_heads_k == 0, "num_heads",
                             "(" + num(p.num_heads) + ") must be a multiple of num_heads_k (" + num(p.num_heads_k) + ")"));
  FA_RETURN_IF_ERROR(require(p.head_dim >= 8 && p.head_dim <= kMaxHeadDim && p.head_dim % 8 == 0, "head_dim",
                             "must be a multiple of 8 in [8, " + num(kMaxHeadDim) + "]" + got(p.head_dim)));
  FA_RETURN_IF_ERROR(require(p.q != nullptr, "q", "is a null pointer"));
  FA_RETURN_IF_ERROR(require(p.out != nullptr, "out", "is a null pointer"));
  FA_RETURN_IF_ERROR(require(p.softmax_lse != nullptr, "softmax_lse", "is a null pointer"));
  if (p.is_varlen()) FA_RETURN_IF_ERROR(require(p.total_q >= 0, "total_q", "must be >= 0" + got(p.total_q)));
  return Status::Ok();
}

Status check_cache(const KVCacheParams& p) {
  FA_RETURN_IF_ERROR(require(p.k_cache != nullptr, "k_cache", "is a null pointer"));
  FA_RETURN_IF_ERROR(require(p.v_cache != nullptr, "v_cache", "is a null pointer"));
  FA_RETURN_IF_ERROR(require(p.cache_batch >= 1, "cache_batch", "must be >= 1" + got(p.cache_batch)));
  FA_RETURN_IF_ERROR(require(p.cache_seqlen >= 1, "cache_seqlen", "must be >= 1" + got(p.cache_seqlen)));
  if (!p.is_paged()) {
    return require(p.cache_batch_idx != nullptr || p.cache_batch >= p.batch, "k_cache",
                   "holds " + num(p.cache_batch) + " sequences, fewer than the batch (" + num(p.batch) + ")");
  }
  FA_RETURN_IF_ERROR(require(p.cache_seqlen % 16 == 0, "page_size",
                             "(k_cache dim 1) must be a multiple of 16" + got(p.cache_seqlen)));
  FA_RETURN_IF_ERROR(require(p.max_blocks_per_seq >= 1, "block_table", "must have >= 1 column"));
  FA_RETURN_IF_ERROR(require(p.block_table_stride >= p.max_blocks_per_seq, "block_table_stride",
                             "must be >= max_blocks_per_seq" + got(p.block_table_stride)));
  return require(p.cache_batch_idx == nullptr, "cache_batch_idx", "cannot be combined with block_table (paged KV)");
}

Status check_new_kv(const KVCacheParams& p) {
  FA_RETURN_IF_ERROR(require((p.k_new == nullptr) == (p.v_new == nullptr), "k_new / v_new",
                             "must be given together"));
  if (!p.has_new_kv()) return Status::Ok();
  FA_RETURN_IF_ERROR(require(p.cache_seqlens != nullptr, "cache_seqlens", "is required when new k / v are appended"));
  FA_RETURN_IF_ERROR(require(p.seqlen_new >= 1, "seqlen_new", "must be >= 1" + got(p.seqlen_new)));
  return require(p.seqlen_new <= p.capacity(), "seqlen_new",
                 "(" + num(p.seqlen_new) + ") exceeds the cache capacity (" + num(p.capacity()) + ")");
}

Status check_rotary(const KVCacheParams& p) {
  FA_RETURN_IF_ERROR(require((p.rotary_cos == nullptr) == (p.rotary_sin == nullptr), "rotary_cos / rotary_sin",
                             "must be given together"));
  if (!p.has_rotary()) return Status::Ok();
  FA_RETURN_IF_ERROR(require(p.rotary_dim >= 2 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.head_dim, "rotary_dim",
                             "must be even and in [2, head_dim = " + num(p.head_dim) + "]" + got(p.rotary_dim)));
  FA_RETURN_IF_ERROR(require(p.seqlen_rotary >= 1, "rotary_cos", "must have >= 1 row"));
  FA_RETURN_IF_ERROR(require(p.rotary_cos_stride >= p.rotary_dim / 2, "rotary_cos_stride", "is smaller than rotary_dim / 2"));
  return require(p.rotary_sin_stride >= p.rotary_dim / 2, "rotary_sin_stride", "is smaller than rotary_dim / 2");
}

Status check_options(const KVCacheParams& p) {
  FA_RETURN_IF_ERROR(require(std::isfinite(p.softmax_scale) && p.softmax_scale > 0.f, "softmax_scale",
                             "must be finite and > 0"));
  FA_RETURN_IF_ERROR(require(std::isfinite(p.softcap) && p.softcap >= 0.f, "softcap", "must be finite and >= 0"));
  FA_RETURN_IF_ERROR(require(p.window_left >= -1, "window_left", "must be >= -1" + got(p.window_left)));
  FA_RETURN_IF_ERROR(require(p.window_right >= -1, "window_right", "must be >= -1" + got(p.window_right)));
  FA_RETURN_IF_ERROR(require(p.alibi_batch_stride >= 0, "alibi_batch_stride", "must be >= 0"));
  return require(p.num_splits >= 0 && p.num_splits <= kMaxSplits, "num_splits",
                 "must be in [0, " + num(kMaxSplits) + "]" + got(p.num_splits));
}

Status check_entry(const int32_t* a, int b, int64_t lo, int64_t hi, const char* name, const std::string& why) {
  if (a[b] >= lo && a[b] <= hi) return Status::Ok();
  return invalid(std::string(name) + "[" + num(b) + "]", "= " + num(a[b]) + " is out of range [" + num(lo) + ", " +
                                                              num(hi) + "]" + why);
}

Status check_sequence(const KVCacheParams& p, const kv::HostIndex& idx, int b) {
  const int64_t room = p.capacity() - p.seqlen_new;
  if (idx.cache_seqlens) {
    FA_RETURN_IF_ERROR(check_entry(idx.cache_seqlens, b, 0, room, "cache_seqlens",
                                   " (capacity " + num(p.capacity()) + " minus seqlen_new " + num(p.seqlen_new) + ")"));
  }
  if (idx.cache_batch_idx) FA_RETURN_IF_ERROR(check_entry(idx.cache_batch_idx, b, 0, p.cache_batch - 1, "cache_batch_idx", ""));
  const kv::SeqInfo s = kv::seq_info(p, idx, b);
  if (idx.cache_leftpad) {
    FA_RETURN_IF_ERROR(check_entry(idx.cache_leftpad, b, 0, s.sk_cache, "cache_leftpad", " (the sequence's cache_seqlens)"));
  }
  if (p.has_rotary()) {
    const int64_t last = std::max(s.sk_cache + p.seqlen_new, kv::q_rotary_position(p, s, s.sq - 1) + 1);
    FA_RETURN_IF_ERROR(require(last <= p.seqlen_rotary, "rotary_cos",
                               "has " + num(p.seqlen_rotary) + " rows but sequence " + num(b) + " needs position " +
                                   num(last - 1)));
  }
  if (!p.is_paged()) return Status::Ok();
  const int32_t* row = idx.block_table + b * p.block_table_stride;
  const int64_t end = s.leftpad + s.sk;  // pages holding rows [leftpad, end) are read or written
  for (int64_t page = s.leftpad / p.cache_seqlen; s.sk > 0 && page * p.cache_seqlen < end; ++page) {
    if (row[page] < 0 || row[page] >= p.cache_batch) {
      return invalid("block_table[" + num(b) + ", " + num(page) + "]",
                     "= " + num(row[page]) + " is not a page index in [0, num_blocks = " + num(p.cache_batch) + ")");
    }
  }
  return Status::Ok();
}

Status check_cu_seqlens_q(const KVCacheParams& p, const int32_t* cu) {
  FA_RETURN_IF_ERROR(require(cu[0] == 0, "cu_seqlens_q", "must start at 0" + got(cu[0])));
  for (int b = 0; b < p.batch; ++b) {
    const int64_t len = int64_t{cu[b + 1]} - cu[b];
    FA_RETURN_IF_ERROR(require(len >= 0 && len <= p.seqlen_q, "cu_seqlens_q",
                               "sequence " + num(b) + " has length " + num(len) + ", outside [0, max_seqlen_q = " +
                                   num(p.seqlen_q) + "]"));
  }
  return require(cu[p.batch] == p.total_q, "cu_seqlens_q",
                 "last entry (" + num(cu[p.batch]) + ") must equal total_q (" + num(p.total_q) + ")");
}

}  // namespace

namespace kv {

SeqInfo seq_info(const KVCacheParams& p, const HostIndex& idx, int b) {
  SeqInfo s;
  s.sk_cache = idx.cache_seqlens ? idx.cache_seqlens[b] : p.capacity();
  s.leftpad = idx.cache_leftpad ? idx.cache_leftpad[b] : 0;
  s.sk = s.sk_cache + p.seqlen_new - s.leftpad;
  s.q_start = idx.cu_seqlens_q ? idx.cu_seqlens_q[b] : 0;
  s.sq = idx.cu_seqlens_q ? idx.cu_seqlens_q[b + 1] - s.q_start : p.seqlen_q;
  s.cache_row = idx.cache_batch_idx ? idx.cache_batch_idx[b] : b;
  return s;
}

Status check_indices(const KVCacheParams& p, const HostIndex& idx) {
  if (idx.cu_seqlens_q) FA_RETURN_IF_ERROR(check_cu_seqlens_q(p, idx.cu_seqlens_q));
  for (int b = 0; b < p.batch; ++b) FA_RETURN_IF_ERROR(check_sequence(p, idx, b));
  return Status::Ok();
}

void normalize(KVCacheParams& p) {
  if (p.causal) p.window_right = 0;
  p.causal = false;
  if (p.window_left >= p.capacity()) p.window_left = -1;
}

}  // namespace kv

Status validate(const KVCacheParams& p) {
  FA_RETURN_IF_ERROR(check_device_dtype(p.device, p.dtype, "dtype"));
  FA_RETURN_IF_ERROR(check_query(p));
  FA_RETURN_IF_ERROR(check_cache(p));
  FA_RETURN_IF_ERROR(check_new_kv(p));
  FA_RETURN_IF_ERROR(check_rotary(p));
  return check_options(p);
}

Status validate(const CombineParams& p) {
  FA_RETURN_IF_ERROR(check_device_dtype(p.device, p.out_dtype, "out_dtype"));
  FA_RETURN_IF_ERROR(require(p.num_splits >= 1, "num_splits", "must be >= 1" + got(p.num_splits)));
  FA_RETURN_IF_ERROR(require(p.batch >= 1, "batch", "must be >= 1" + got(p.batch)));
  FA_RETURN_IF_ERROR(require(p.seqlen >= 1, "seqlen", "must be >= 1" + got(p.seqlen)));
  FA_RETURN_IF_ERROR(require(p.num_heads >= 1, "num_heads", "must be >= 1" + got(p.num_heads)));
  FA_RETURN_IF_ERROR(require(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim, "head_dim",
                             "must be in [1, " + num(kMaxHeadDim) + "]" + got(p.head_dim)));
  FA_RETURN_IF_ERROR(require(p.out_partial != nullptr, "out_partial", "is a null pointer"));
  FA_RETURN_IF_ERROR(require(p.lse_partial != nullptr, "lse_partial", "is a null pointer"));
  return require(p.out != nullptr, "out", "is a null pointer");
}

Status kvcache_forward(KVCacheParams params) {
  FA_RETURN_IF_ERROR(validate(params));
  kv::normalize(params);
  if (params.device == Device::kCPU) {
    FA_RETURN_IF_ERROR(kv::check_indices(params, kv::HostIndex::of(params)));
    return cpu::kvcache_forward(params);
  }
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::kvcache_forward(params);
#else
  return Status::NotSupported("built without CUDA");
#endif
}

Status combine(CombineParams params) {
  FA_RETURN_IF_ERROR(validate(params));
  if (params.device == Device::kCPU) return cpu::combine(params);
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::combine(params);
#else
  return Status::NotSupported("built without CUDA");
#endif
}

std::size_t kvcache_workspace_size(const KVCacheParams& params) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  if (params.device == Device::kCUDA) {
    KVCacheParams p = params;
    kv::normalize(p);
    return cuda::kvcache_workspace_size(p);
  }
#endif
  return 0;
}

}  // namespace flash_attention
