// Device-side parameters of the sm80 backward kernels (built from BackwardParams in backward.cu).
// Plain data only: it is passed by value to every kernel launch.
#pragma once

#include <cstdint>

namespace flash_attention::sm80 {

struct BwdKernelParams {
  // Inputs (device pointers, element strides).
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;  // (B, H, Sq) or varlen (H, total_q)
  int64_t q_batch, q_row, q_head;
  int64_t k_batch, k_row, k_head;
  int64_t v_batch, v_row, v_head;
  int64_t o_batch, o_row, o_head;
  int64_t do_batch, do_row, do_head;

  // Outputs.
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_batch, dq_row, dq_head;
  int64_t dk_batch, dk_row, dk_head;
  int64_t dv_batch, dv_row, dv_head;

  // Workspace (see backward.cu): dsum = rowsum(dO * O), same layout as lse;
  // dq_accum = fp32 (splits, H, q_rows, head_dim_padded), zeroed before the main kernel.
  float* dsum;
  float* dq_accum;
  int64_t dq_accum_split_stride;  // elements between splits
  int64_t q_rows;                 // B * Sq, or total_q for varlen
  int num_splits;                 // 1 unless deterministic

  // Shapes. For varlen, seqlen_q/k are the maxima and cu_seqlens give the per-sequence bounds.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim;
  int64_t total_q;

  // Options.
  float scale;             // softmax_scale
  float scale_log2;        // softmax_scale * log2(e)
  float softcap;           // 0 = off
  int window_left;         // -1 = unbounded (causal folded in by normalize())
  int window_right;
  const float* alibi_slopes;
  int64_t alibi_batch_stride;
  float dropout_p;
  float dropout_rescale;   // 1 / (1 - p)
  uint64_t philox_seed;
  uint64_t philox_offset;
  bool deterministic;
};

}  // namespace flash_attention::sm80
