// Runtime arguments of the sm90 backward kernels that are not TMA descriptors (plain data, host +
// device). One struct serves the three kernels of a backward call: preprocess, main, dQ conversion.
#pragma once

#include <cstdint>

#include "cuda/sm90/fwd_args.h"  // FA_SM90_HOST_DEVICE

namespace flash_attention::sm90 {

struct BwdArgs {
  int batch = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  int num_heads = 0;
  int heads_per_kv_head = 1;  // GQA group size; a CTA sums dK/dV over the group's query heads
  int head_dim = 0;           // actual head dim (<= the kernel's; TMA zero-fills the rest)
  int m_blocks = 0;           // query blocks per (batch, head): ceil(seqlen_q / block_m)

  // Inputs read by the preprocess only (the main kernel reads q, k, v, dout through TMA).
  const void* out = nullptr;
  const void* dout = nullptr;
  int64_t out_row = 0, out_head = 0, out_batch = 0;  // strides in elements
  int64_t dout_row = 0, dout_head = 0, dout_batch = 0;
  const float* lse = nullptr;  // (B, H, Sq) natural log, +inf for rows with no visible key

  // Workspace, rows padded to m_blocks * block_m:
  //   lse_log2 (B, H, rows): lse * log2(e), +inf on padding rows (so P = 0 there)
  //   dsum     (B, H, rows): rowsum(dO * O), 0 on padding rows
  //   dq_accum (B, H, m_blocks, block_m * head_dim_kernel): fp32 dQ in the register order of the
  //            main kernel's dQ fragments (see dq_chunk_offset), zeroed by the preprocess.
  //   dq_turns (B, H, m_blocks) ints, deterministic=True only: dQ adds done per tile (see wait_dq_turn),
  //            zeroed by the preprocess.
  float* lse_log2 = nullptr;
  float* dsum = nullptr;
  float* dq_accum = nullptr;
  int* dq_turns = nullptr;

  // Outputs.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_row = 0, dq_head = 0, dq_batch = 0;
  int64_t dk_row = 0, dk_head = 0, dk_batch = 0;
  int64_t dv_row = 0, dv_head = 0, dv_batch = 0;

  float scale = 0.f;       // softmax_scale (dQ and dK are scale * dS-products)
  float scale_log2 = 0.f;  // softmax_scale * log2(e)
  int window_left = -1;    // -1 = unbounded; causal is window_right = 0
  int window_right = -1;
};

}  // namespace flash_attention::sm90
