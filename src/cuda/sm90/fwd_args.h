// Runtime arguments of the sm90 forward kernel that are not TMA descriptors (plain data, host + device).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_SM90_HOST_DEVICE __host__ __device__
#else
#define FA_SM90_HOST_DEVICE
#endif

namespace flash_attention::sm90 {

// Switchable parts of the forward kernel (FwdArgs::features; FLASH_ATTENTION_SM90_FWD, an integer mask,
// overrides the default per call, for A/B runs).
enum FwdFeature : unsigned {
  kFwdTmaStoreO = 1u,  // O leaves through shared memory and a TMA store (else pairs stored from registers)
  kFwdLazyRescale = 2u,  // a row max moves only when it grows by more than kLazyRescaleSlack (not FP8)
  kFwdDynamicTiles = 4u,  // causal / local: CTAs take tiles from a counter (FwdArgs::tile_counter) where that
                          // measured faster (fwd_launch.h, use_dynamic_tiles)
  kFwdDynamicAlways = 8u,  // ... for every causal / local / varlen call with more tiles than CTAs (A/B, tests)
  kFwdSkipRescale = 16u,  // a warp skips the O rescale when none of its rows' max moved (FwdTraits::
                          // kExpsBeforePVWait kernels; the others always rescale, hidden under the exponentials)
  kFwdDefault = kFwdTmaStoreO | kFwdLazyRescale | kFwdDynamicTiles | kFwdSkipRescale,
};

// With kFwdLazyRescale (log2 units): P = exp2(score - row max) may reach 2^8 until the max moves; fp32 sums
// and the fp16 / bf16 P operand hold that with no loss. Without it the max moves whenever it grows.
constexpr float kLazyRescaleSlack = 8.f;

struct FwdArgs {
  int seqlen_q = 0;  // exact, or the maximum over the batch for varlen
  int seqlen_k = 0;
  int num_heads = 0;
  int heads_per_kv_head = 1;  // GQA group size
  int head_dim = 0;           // actual head dim (<= the kernel's, the rest is zero-padded by TMA)
  const int32_t* cu_seqlens_q = nullptr;  // varlen: row offsets, else null
  const int32_t* cu_seqlens_k = nullptr;

  void* out = nullptr;
  int64_t out_row = 0, out_head = 0, out_batch = 0;  // strides in elements
  float* lse = nullptr;
  int64_t total_q = 0;  // varlen: rows of q (lse is (H, total_q))

  float scale_log2 = 0.f;   // exponent scale applied to raw scores (softcap folded in)
  float softcap_pre = 0.f;  // > 0: scores become tanh(score * softcap_pre) before scale_log2
  int window_left = -1;     // -1 = unbounded; causal is window_right = 0
  int window_right = -1;
  // FP8 only (null = 1): contiguous (batch, heads / heads_per_kv_head) factors; q * k folds into the
  // score scale of a tile, v into its output scale.
  const float* q_descale = nullptr;
  const float* k_descale = nullptr;
  const float* v_descale = nullptr;

  // Persistent tile schedule: tiles are (query block, head, batch), taken in sections of
  // heads_per_section (batch, head) pairs; within a section the last query blocks come first, heads
  // fastest. Dense attention uses sections of one head (its query blocks run together and share K/V
  // in L2); causal / local uses sections whose K/V fit in half the L2, for a heaviest-first order.
  int batch = 0;
  int m_blocks = 0;  // query blocks per (batch, head), from the (max) seqlen_q
  int num_tiles = 0;
  int heads_per_section = 1;  // in units of (batch, head) pairs
  // Non-null (kFwdDynamicTiles): the same order, but a CTA's next tile is the next one nobody has taken
  // (gridDim.x + an atomic count from 0), so that light and heavy tiles balance as they run.
  int* tile_counter = nullptr;

  unsigned features = kFwdDefault;

  FA_SM90_HOST_DEVICE bool is_varlen() const { return cu_seqlens_q != nullptr; }
  FA_SM90_HOST_DEVICE bool has(FwdFeature f) const { return (features & f) != 0; }
};

}  // namespace flash_attention::sm90
