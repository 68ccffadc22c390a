// Kernel-side arguments of the sm80 forward kernel (a flat, trivially copyable view of ForwardParams
// with the scales precomputed), and the per-sequence offsets every kernel derives from them.
#pragma once

#include <cstdint>

namespace flash_attention::sm80 {

struct FwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  // Element strides: batch, row (sequence), head. The head dim is contiguous.
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  int batch, seqlen_q, seqlen_k;  // varlen: max lengths
  int num_heads, num_heads_k, head_dim;
  int64_t total_q;                // varlen: rows of q (the LSE row stride)
  const int32_t* cu_seqlens_q;    // null unless varlen
  const int32_t* cu_seqlens_k;

  // Scores are kept in "accumulator units" s: s = q.k, or tanh(q.k * softmax_scale / softcap) when
  // softcap > 0. The natural score is s * score_scale, and exp(natural) = exp2(s * scale_log2).
  float scale_log2;
  float score_scale;
  float softcap_prescale;  // softmax_scale / softcap (softcap > 0 only)
  bool softcap;

  int window_left, window_right;  // -1 = unbounded (causal: right = 0)

  const float* alibi_slopes;  // null = none; (H) or (B, H) with alibi_batch_stride
  int64_t alibi_batch_stride;

  float dropout_p;
  float dropout_rescale;  // 1 / (1 - p)
  uint64_t philox_seed, philox_offset;

  bool has_extras() const { return softcap || alibi_slopes != nullptr || dropout_p > 0.f; }
};

// Where sequence `b` lives: its lengths and the element offsets of its first row, for padded
// (batch-strided) and varlen (cu_seqlens) layouts alike.
struct SeqInfo {
  bool varlen;
  int seqlen_q, seqlen_k;
  int64_t q_row0, k_row0;  // varlen: first row of this sequence in the packed dimension

  __device__ SeqInfo(const FwdArgs& a, int b) : varlen(a.cu_seqlens_q != nullptr) {
    if (varlen) {
      q_row0 = a.cu_seqlens_q[b];
      k_row0 = a.cu_seqlens_k[b];
      seqlen_q = int(a.cu_seqlens_q[b + 1] - q_row0);
      seqlen_k = int(a.cu_seqlens_k[b + 1] - k_row0);
    } else {
      q_row0 = k_row0 = 0;
      seqlen_q = a.seqlen_q;
      seqlen_k = a.seqlen_k;
    }
  }

  __device__ int64_t q_offset(int64_t batch_stride, int64_t row_stride, int b) const {
    return varlen ? q_row0 * row_stride : int64_t(b) * batch_stride;
  }
  __device__ int64_t k_offset(int64_t batch_stride, int64_t row_stride, int b) const {
    return varlen ? k_row0 * row_stride : int64_t(b) * batch_stride;
  }
  // Index of (b, h, row 0) in the LSE: (B, H, Sq) padded, (H, total_q) varlen.
  __device__ int64_t lse_offset(const FwdArgs& a, int b, int h) const {
    return varlen ? int64_t(h) * a.total_q + q_row0 : (int64_t(b) * a.num_heads + h) * a.seqlen_q;
  }
};

}  // namespace flash_attention::sm80
