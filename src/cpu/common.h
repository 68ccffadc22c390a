// Shared pieces of the CPU forward and backward: dtype conversion, aligned scratch buffers,
// sequence geometry (dense / varlen), the attention mask and the score transform
// (scale, softcap, alibi, mask) applied to one block of q k^T.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "cpu/simd.h"
#include "flash_attention/flash_attention.h"

namespace flash_attention::cpu {

// Upper bound of the fp32 copies of K/V (and Q/dO in the backward) held at one time.
constexpr int64_t kStagingBytes = int64_t{1} << 29;

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Staging of K / V (and other per-key tensors) in blocks of kLanes rows: load_block reads rows
// [j0, j0 + kLanes) of head h of a (B, S, H, D) / varlen tensor as fp32 into `block` (kLanes x Dp,
// row-major); rows from `rows` on (past the sequence) and columns from D on are zero.
struct RowSource {
  const void* base;
  TensorStrides strides;
  int b;
  int64_t row0;  // first packed row of the sequence (varlen)
  int rows;      // rows in the sequence
  int h;
};
void load_block(const ForwardParams& p, const RowSource& src, int j0, int Dp, float* block);
// The block transposed: the D x kLanes panel of keys [j0, j0 + kLanes) of a D x skp matrix (K^T)
// in panel layout (MatB::panels with K = D), which starts at kt + j0 * D.
void block_to_transposed_panel(const float* block, int D, int Dp, float* panel);
// The block as rows [j0, j0 + kLanes) of a skp x Dp matrix in panel layout (MatB::panels with K = skp).
void block_to_panels(const float* block, int Dp, int skp, int j0, float* dst);

// Converts n elements of `dtype` at src to fp32 / fp32 to `dtype`.
void load_row(DType dtype, const void* src, int n, float* dst);
void store_row(DType dtype, const float* src, int n, void* dst);

inline const void* element(const void* base, DType dtype, int64_t offset) {
  return static_cast<const char*>(base) + offset * static_cast<int64_t>(dtype_size(dtype));
}
inline void* element(void* base, DType dtype, int64_t offset) {
  return static_cast<char*>(base) + offset * static_cast<int64_t>(dtype_size(dtype));
}

// 64-byte aligned fp32 scratch.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&&) = default;
  Buffer& operator=(Buffer&&) = default;
  explicit Buffer(int64_t n)
      : data_(static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64 + 64))) {}
  float* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
};

// 64-byte aligned fp32 memory of at least `floats` that is kept by the thread when the object
// dies (up to kKeepBytes per slot) and handed to the next object of the same slot: repeated calls
// reuse warm pages instead of faulting on fresh ones. At most one live object per thread and slot.
enum class CacheSlot : int { kStaging = 0, kWork = 1 };
constexpr int kCacheSlots = 2;
constexpr int64_t kKeepBytes = int64_t{1} << 27;
class CachedBuffer {
 public:
  CachedBuffer(int64_t floats, CacheSlot slot);
  ~CachedBuffer();
  CachedBuffer(const CachedBuffer&) = delete;
  CachedBuffer& operator=(const CachedBuffer&) = delete;
  float* get() const { return buffer_.get(); }
  int64_t floats() const { return floats_; }

 private:
  Buffer buffer_;
  int64_t floats_;
  CacheSlot slot_;
};

// Staging memory for one call: chunk() slots of `slot_floats` each, one per (batch, kv head) group of
// a chunk, as many groups as fit in kStagingBytes (at least one).
class StagingBuffer {
 public:
  StagingBuffer(int64_t slot_floats, int groups);
  int chunk() const { return chunk_; }
  float* slot(int g) const { return buffer_.get() + g * slot_floats_; }
  Status status() const;  // kInternal when the allocation failed

 private:
  int64_t slot_floats_;
  int chunk_;
  CachedBuffer buffer_;
};

// Threads for a call: the requested count (0 = the OpenMP default), but at most one per
// kWorkPerThread multiply-adds of q k^T, so that small calls do not wait on waking threads.
constexpr int64_t kWorkPerThread = int64_t{1} << 22;
int resolve_threads(const ForwardParams& p);

// One sequence of the batch: first packed row (varlen) and lengths.
struct Seq {
  int64_t q0 = 0, k0 = 0;
  int sq = 0, sk = 0;
};

inline Seq seq_of(const ForwardParams& p, int b) {
  if (!p.is_varlen()) return {0, 0, p.seqlen_q, p.seqlen_k};
  return {p.cu_seqlens_q[b], p.cu_seqlens_k[b], p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b],
          p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]};
}

// Element offset of (batch b, in-sequence row i, head h) in a (B, S, H, D) or (total, H, D) tensor.
inline int64_t row_offset(const ForwardParams& p, const TensorStrides& s, int b, int64_t row0, int i, int h) {
  return (p.is_varlen() ? 0 : b * s.batch) + (row0 + i) * s.row + int64_t{h} * s.head;
}

inline int64_t lse_offset(const ForwardParams& p, const Seq& s, int b, int h, int i) {
  if (p.is_varlen()) return h * p.total_q + s.q0 + i;
  return (int64_t{b} * p.num_heads + h) * p.seqlen_q + i;
}

// Visible keys of query row i: [key_lo(i), key_hi(i)] (empty when lo > hi).
struct Mask {
  int left, right, sq, sk;
  int shift() const { return sk - sq; }
  int key_lo(int i) const { return left < 0 ? 0 : std::max(0, i + shift() - left); }
  int key_hi(int i) const { return right < 0 ? sk - 1 : std::min(sk - 1, i + shift() + right); }
  // Query rows that see at least one key of [j0, j1]: [query_lo, query_hi].
  int query_lo(int j0) const { return right < 0 ? 0 : std::max(0, j0 - shift() - right); }
  int query_hi(int j1) const { return left < 0 ? sq - 1 : std::min(sq - 1, j1 - shift() + left); }
  // True when every row of [i0, i1] sees every key of [j0, j1].
  bool covers(int i0, int i1, int j0, int j1) const { return j0 >= key_lo(i1) && j1 <= key_hi(i0); }
};

// Everything the score transform needs for one (b, h).
struct ScoreOps {
  float scale;
  float softcap;  // 0 = off
  float slope;    // alibi slope, 0 = off
  Mask mask;
};

inline ScoreOps score_ops(const ForwardParams& p, const Seq& s, int b, int h) {
  const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
  return {p.softmax_scale, p.softcap, slope, Mask{p.window_left, p.window_right, s.sq, s.sk}};
}

// s (rows x n, leading dim ld, n a multiple of kLanes) holds q k^T for query rows i0.. and keys
// j0... When the call has softcap or alibi, turns s into logits in place (scale, softcap, alibi) and
// returns 1; otherwise leaves s alone and returns softmax_scale. Either way logits = s * result,
// and the softmax can fold that factor into its exp. When dcap is given (softcap backward) it
// receives d(logit)/d(scaled score) = 1 - tanh^2.
float transform_scores(float* s, int ld, int rows, int n, int i0, int j0, const ScoreOps& ops, float* dcap);

// Sets the entries of s outside the mask to -inf.
void mask_scores(float* s, int ld, int rows, int n, int i0, int j0, const Mask& mask);

// In place: p[r][c] *= keep(i0 + r, j0 + c) / (1 - p_drop), dropped entries become 0.
void apply_dropout(float* p, int ld, int rows, int n, int i0, int j0, int64_t bh,
                   const ForwardParams& params);

}  // namespace flash_attention::cpu
