// CPU implementation of the KV-cache path (the reference for the CUDA kernels). It appends the new keys /
// values (with rotary) to the cache in place, gathers each sequence's effective keys into a packed varlen
// buffer, rotates q, and hands the attention itself to the CPU forward (varlen), so that the blocked
// online softmax, masks, ALiBi and softcap are written once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/kvcache_cpu.h"
#include "cpu/kvcache_rotary.h"
#include "flash_attention/flash_attention.h"

namespace flash_attention::cpu {
namespace {

// Element offset of (position pos, head h) of sequence b in a cache with strides st.
int64_t cache_offset(const KVCacheParams& p, const kv::SeqInfo& s, int b, const TensorStrides& st, int64_t pos, int h) {
  if (!p.is_paged()) return s.cache_row * st.batch + pos * st.row + h * st.head;
  const int64_t page = p.block_table[b * p.block_table_stride + pos / p.cache_seqlen];
  return page * st.batch + (pos % p.cache_seqlen) * st.row + h * st.head;
}

// Copies one head row of head_dim elements, rotating the first rotary_dim dims at position pos when rotate.
void copy_row(const KVCacheParams& p, const void* src, int64_t src_off, void* dst, int64_t dst_off, int64_t pos,
              bool rotate) {
  if (!rotate || !p.has_rotary()) {
    std::memcpy(element(dst, p.dtype, dst_off), element(src, p.dtype, src_off), p.head_dim * dtype_size(p.dtype));
    return;
  }
  float x[256], cos[128], sin[128];
  const int half = p.rotary_dim / 2;
  load_row(p.dtype, element(src, p.dtype, src_off), p.head_dim, x);
  load_row(p.dtype, element(p.rotary_cos, p.dtype, pos * p.rotary_cos_stride), half, cos);
  load_row(p.dtype, element(p.rotary_sin, p.dtype, pos * p.rotary_sin_stride), half, sin);
  for (int t = 0; t < half; ++t) {
    kv::rotate_pair(x[kv::rotary_first(t, p.rotary_dim, p.rotary_interleaved)],
                    x[kv::rotary_second(t, p.rotary_dim, p.rotary_interleaved)], cos[t], sin[t]);
  }
  store_row(p.dtype, x, p.head_dim, element(dst, p.dtype, dst_off));
}

// Writes k_new / v_new into the cache at positions sk_cache[b] + s (k rotated).
void append_new_kv(const KVCacheParams& p, const std::vector<kv::SeqInfo>& seqs) {
  for (int b = 0; b < p.batch; ++b) {  // sequential: duplicate cache_batch_idx entries resolve to the last
    for (int s = 0; s < p.seqlen_new; ++s) {
      const int64_t pos = seqs[b].sk_cache + s;
      for (int h = 0; h < p.num_heads_k; ++h) {
        const TensorStrides &ks = p.k_new_strides, &vs = p.v_new_strides;
        copy_row(p, p.k_new, b * ks.batch + s * ks.row + h * ks.head, p.k_cache,
                 cache_offset(p, seqs[b], b, p.k_cache_strides, pos, h), pos, true);
        copy_row(p, p.v_new, b * vs.batch + s * vs.row + h * vs.head, p.v_cache,
                 cache_offset(p, seqs[b], b, p.v_cache_strides, pos, h), pos, false);
      }
    }
  }
}

// Packed (total_k, Hk, D) copy of each sequence's effective keys (cache rows [leftpad, leftpad + sk)).
std::vector<char> gather(const KVCacheParams& p, const std::vector<kv::SeqInfo>& seqs, const std::vector<int32_t>& cu_k,
                         const void* cache, const TensorStrides& st) {
  const int64_t row = int64_t{p.num_heads_k} * p.head_dim;
  std::vector<char> packed(std::max<int64_t>(cu_k.back(), 1) * row * dtype_size(p.dtype));
  for (int b = 0; b < p.batch; ++b) {
    for (int64_t j = 0; j < seqs[b].sk; ++j) {
      for (int h = 0; h < p.num_heads_k; ++h) {
        copy_row(p, cache, cache_offset(p, seqs[b], b, st, seqs[b].leftpad + j, h), packed.data(),
                 (cu_k[b] + j) * row + h * p.head_dim, 0, false);
      }
    }
  }
  return packed;
}

// Packed (total_q, H, D) copy of q, rotated.
std::vector<char> packed_query(const KVCacheParams& p, const std::vector<kv::SeqInfo>& seqs,
                               const std::vector<int32_t>& cu_q) {
  const int64_t row = int64_t{p.num_heads} * p.head_dim;
  std::vector<char> packed(std::max<int64_t>(cu_q.back(), 1) * row * dtype_size(p.dtype));
  for (int b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < seqs[b].sq; ++i) {
      const int64_t src_row = p.is_varlen() ? seqs[b].q_start + i : i;
      const int64_t src_batch = p.is_varlen() ? 0 : b;
      for (int h = 0; h < p.num_heads; ++h) {
        copy_row(p, p.q, src_batch * p.q_strides.batch + src_row * p.q_strides.row + h * p.q_strides.head,
                 packed.data(), (cu_q[b] + i) * row + h * p.head_dim, kv::q_rotary_position(p, seqs[b], i), true);
      }
    }
  }
  return packed;
}

std::vector<int32_t> prefix_sum(const std::vector<kv::SeqInfo>& seqs, int64_t kv::SeqInfo::*len) {
  std::vector<int32_t> cu(seqs.size() + 1, 0);
  for (std::size_t b = 0; b < seqs.size(); ++b) cu[b + 1] = static_cast<int32_t>(cu[b] + seqs[b].*len);
  return cu;
}

// The varlen forward over the packed buffers; writes packed out (total_q, H, D) and lse (H, total_q).
Status attend(const KVCacheParams& p, const std::vector<int32_t>& cu_q, const std::vector<int32_t>& cu_k,
              const std::vector<char>& q, const std::vector<char>& k, const std::vector<char>& v, void* out,
              float* lse) {
  ForwardParams f;
  f.device = Device::kCPU;
  f.dtype = p.dtype;
  f.batch = p.batch;
  f.num_heads = p.num_heads;
  f.num_heads_k = p.num_heads_k;
  f.head_dim = p.head_dim;
  f.total_q = cu_q.back();
  f.total_k = cu_k.back();
  for (int b = 0; b < p.batch; ++b) {
    f.seqlen_q = std::max(f.seqlen_q, cu_q[b + 1] - cu_q[b]);
    f.seqlen_k = std::max(f.seqlen_k, cu_k[b + 1] - cu_k[b]);
  }
  f.q = q.data();
  f.k = k.data();
  f.v = v.data();
  f.out = out;
  f.softmax_lse = lse;
  f.q_strides = f.out_strides = {0, int64_t{p.num_heads} * p.head_dim, p.head_dim};
  f.k_strides = f.v_strides = {0, int64_t{p.num_heads_k} * p.head_dim, p.head_dim};
  f.cu_seqlens_q = cu_q.data();
  f.cu_seqlens_k = cu_k.data();
  f.softmax_scale = p.softmax_scale;
  f.window_left = p.window_left;
  f.window_right = p.window_right;
  f.softcap = p.softcap;
  f.alibi_slopes = p.alibi_slopes;
  f.alibi_batch_stride = p.alibi_batch_stride;
  f.num_threads = p.num_threads;
  return forward(f);
}

// Copies the packed results to the caller's out / softmax_lse layouts.
void scatter(const KVCacheParams& p, const std::vector<kv::SeqInfo>& seqs, const std::vector<int32_t>& cu_q,
             const std::vector<char>& out, const std::vector<float>& lse) {
  const int64_t total_q = cu_q.back();
  for (int b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < seqs[b].sq; ++i) {
      const int64_t t = cu_q[b] + i;
      const int64_t dst_batch = p.is_varlen() ? 0 : b, dst_row = p.is_varlen() ? seqs[b].q_start + i : i;
      for (int h = 0; h < p.num_heads; ++h) {
        copy_row(p, out.data(), (t * p.num_heads + h) * p.head_dim, p.out,
                 dst_batch * p.out_strides.batch + dst_row * p.out_strides.row + h * p.out_strides.head, 0, false);
        const int64_t lse_at = p.is_varlen() ? h * p.total_q + dst_row : (int64_t{b} * p.num_heads + h) * p.seqlen_q + i;
        p.softmax_lse[lse_at] = lse[h * total_q + t];
      }
    }
  }
}

}  // namespace

Status kvcache_forward(const KVCacheParams& p) {
  const kv::HostIndex idx = kv::HostIndex::of(p);
  std::vector<kv::SeqInfo> seqs(p.batch);
  for (int b = 0; b < p.batch; ++b) seqs[b] = kv::seq_info(p, idx, b);
  if (p.has_new_kv()) append_new_kv(p, seqs);

  const std::vector<int32_t> cu_q = prefix_sum(seqs, &kv::SeqInfo::sq);
  const std::vector<int32_t> cu_k = prefix_sum(seqs, &kv::SeqInfo::sk);
  const std::vector<char> q = packed_query(p, seqs, cu_q);
  const std::vector<char> k = gather(p, seqs, cu_k, p.k_cache, p.k_cache_strides);
  const std::vector<char> v = gather(p, seqs, cu_k, p.v_cache, p.v_cache_strides);
  std::vector<char> out(q.size());
  std::vector<float> lse(std::max<int64_t>(cu_q.back(), 1) * p.num_heads, std::numeric_limits<float>::infinity());
  if (cu_k.back() > 0) {
    FA_RETURN_IF_ERROR(attend(p, cu_q, cu_k, q, k, v, out.data(), lse.data()));
  } else {  // no sequence has a key: every row is fully masked
    std::memset(out.data(), 0, out.size());
  }
  scatter(p, seqs, cu_q, out, lse);
  return Status::Ok();
}

Status combine(const CombineParams& p) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> weight(p.num_splits);
  float row[256];
  for (int b = 0; b < p.batch; ++b) {
    for (int i = 0; i < p.seqlen; ++i) {
      for (int h = 0; h < p.num_heads; ++h) {
        const float* lse = p.lse_partial + b * p.lse_batch_stride + i * p.lse_row_stride + h * p.lse_head_stride;
        float mx = -inf;
        for (int s = 0; s < p.num_splits; ++s) mx = std::max(mx, lse[s * p.lse_split_stride]);
        double sum = 0.0;
        for (int s = 0; s < p.num_splits; ++s) {
          weight[s] = mx == -inf ? 0.f : std::exp(lse[s * p.lse_split_stride] - mx);
          sum += weight[s];
        }
        const float total = mx == -inf ? inf : mx + static_cast<float>(std::log(sum));
        const TensorStrides& os = p.out_partial_strides;
        for (int d = 0; d < p.head_dim; ++d) {
          double acc = 0.0;
          for (int s = 0; s < p.num_splits; ++s) {
            if (weight[s] == 0.f) continue;
            acc += weight[s] * p.out_partial[s * p.out_partial_split_stride + b * os.batch + i * os.row + h * os.head + d];
          }
          row[d] = mx == -inf ? 0.f : static_cast<float>(acc / sum);
        }
        const int64_t o = b * p.out_strides.batch + i * p.out_strides.row + h * p.out_strides.head;
        store_row(p.out_dtype, row, p.head_dim, element(p.out, p.out_dtype, o));
        if (p.softmax_lse) p.softmax_lse[(int64_t{b} * p.num_heads + h) * p.seqlen + i] = total;
      }
    }
  }
  return Status::Ok();
}

}  // namespace flash_attention::cpu
