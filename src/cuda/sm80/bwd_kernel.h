// sm80 backward kernels (FlashAttention-2 algorithm, tensor cores through CuTe):
//   bwd_dsum_kernel      dsum = rowsum(dO * O) in fp32 (the "D" of the FA2 paper)
//   bwd_main_kernel      one CTA per (key block, batch, kv head): dK, dV on chip, dQ into fp32 accumulators
//   bwd_dq_kernel        dQ = softmax_scale * sum over splits of the accumulators, converted to fp16/bf16
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "common/philox.h"
#include "cuda/sm80/bwd_params.h"
#include "cuda/sm80/bwd_traits.h"
#include "cuda/sm80/copy.h"
#include "cuda/sm80/mask.h"
#include "cuda/sm80/utils.h"

namespace flash_attention::sm80 {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;

// Where one batch entry lives: its lengths and the first row of its rows (packed for varlen).
struct SeqSpan {
  int seqlen_q, seqlen_k;
  int64_t q_row0, k_row0;  // row of position 0 in the (B*S) or packed row space
  bool varlen;

  __device__ SeqSpan(const BwdKernelParams& p, int b) : varlen(p.cu_seqlens_q != nullptr) {
    if (varlen) {
      q_row0 = p.cu_seqlens_q[b];
      k_row0 = p.cu_seqlens_k[b];
      seqlen_q = p.cu_seqlens_q[b + 1] - static_cast<int>(q_row0);
      seqlen_k = p.cu_seqlens_k[b + 1] - static_cast<int>(k_row0);
    } else {
      seqlen_q = p.seqlen_q;
      seqlen_k = p.seqlen_k;
      q_row0 = int64_t(b) * p.seqlen_q;
      k_row0 = int64_t(b) * p.seqlen_k;
    }
  }
  // Element offset of (b, position 0) in a (B, S, H, D) / packed tensor.
  __device__ int64_t q_base(int b, int64_t batch_stride, int64_t row_stride) const {
    return varlen ? q_row0 * row_stride : b * batch_stride;
  }
  __device__ int64_t k_base(int b, int64_t batch_stride, int64_t row_stride) const {
    return varlen ? k_row0 * row_stride : b * batch_stride;
  }
  // Index of (b, h, position 0) in softmax_lse / dsum.
  __device__ int64_t lse_base(const BwdKernelParams& p, int b, int h) const {
    return varlen ? h * p.total_q + q_row0 : (int64_t(b) * p.num_heads + h) * p.seqlen_q;
  }
};

// ---------------------------------------------------------------------------------------------
// Row kernels: 8 columns per thread, a power-of-two group of threads per row (the row reduction is a
// butterfly), lanes past the head dim idle.
// ---------------------------------------------------------------------------------------------
constexpr int kRowKernelThreads = 256;

template <int kHeadDim>
constexpr int row_threads() {
  int n = 1;
  while (n * 8 < kHeadDim) n *= 2;
  return n;
}

template <int kHeadDim>
constexpr int rows_per_row_cta() {
  return kRowKernelThreads / row_threads<kHeadDim>();
}

// Preprocess: dsum[b, h, i] = sum_d dO[i, d] * O[i, d].
template <int kHeadDim, class Element>
__global__ void __launch_bounds__(kRowKernelThreads) bwd_dsum_kernel(const __grid_constant__ BwdKernelParams p) {
  constexpr int kRowThreads = row_threads<kHeadDim>();
  constexpr int kRows = rows_per_row_cta<kHeadDim>();
  const int b = blockIdx.y, h = blockIdx.z;
  const SeqSpan seq(p, b);
  const int i = blockIdx.x * kRows + threadIdx.x / kRowThreads;
  const int c = (threadIdx.x % kRowThreads) * 8;
  float sum = 0.f;
  if (i < seq.seqlen_q && c < p.head_dim) {
    const auto* o = static_cast<const Element*>(p.out) + seq.q_base(b, p.o_batch, p.o_row) +
                    i * p.o_row + h * p.o_head + c;
    const auto* d = static_cast<const Element*>(p.dout) + seq.q_base(b, p.do_batch, p.do_row) +
                    i * p.do_row + h * p.do_head + c;
    alignas(16) Element ov[8];
    alignas(16) Element dv[8];
    *reinterpret_cast<uint4*>(ov) = *reinterpret_cast<const uint4*>(o);
    *reinterpret_cast<uint4*>(dv) = *reinterpret_cast<const uint4*>(d);
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) sum += static_cast<float>(ov[e]) * static_cast<float>(dv[e]);
  }
  CUTE_UNROLL
  for (int lanes = kRowThreads / 2; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
  if (i < seq.seqlen_q && threadIdx.x % kRowThreads == 0) p.dsum[seq.lse_base(p, b, h) + i] = sum;
}

// ---------------------------------------------------------------------------------------------
// Postprocess: dQ = softmax_scale * sum over splits (fixed order) of dq_accum.
// ---------------------------------------------------------------------------------------------
template <int kHeadDim, class Element>
__global__ void __launch_bounds__(kRowKernelThreads) bwd_dq_kernel(const __grid_constant__ BwdKernelParams p) {
  constexpr int kRowThreads = row_threads<kHeadDim>();
  constexpr int kRows = rows_per_row_cta<kHeadDim>();
  const int b = blockIdx.y, h = blockIdx.z;
  const SeqSpan seq(p, b);
  const int i = blockIdx.x * kRows + threadIdx.x / kRowThreads;
  const int c = (threadIdx.x % kRowThreads) * 8;
  if (i >= seq.seqlen_q || c >= p.head_dim) return;
  const float* acc = p.dq_accum + (h * p.q_rows + seq.q_row0 + i) * kHeadDim + c;
  float sum[8] = {};
  for (int s = 0; s < p.num_splits; ++s) {
    const float4 lo = *reinterpret_cast<const float4*>(acc + s * p.dq_accum_split_stride);
    const float4 hi = *reinterpret_cast<const float4*>(acc + s * p.dq_accum_split_stride + 4);
    sum[0] += lo.x, sum[1] += lo.y, sum[2] += lo.z, sum[3] += lo.w;
    sum[4] += hi.x, sum[5] += hi.y, sum[6] += hi.z, sum[7] += hi.w;
  }
  alignas(16) Element out[8];
  CUTE_UNROLL
  for (int e = 0; e < 8; ++e) out[e] = static_cast<Element>(sum[e] * p.scale);
  auto* dq = static_cast<Element*>(p.dq) + seq.q_base(b, p.dq_batch, p.dq_row) + i * p.dq_row +
             h * p.dq_head + c;
  *reinterpret_cast<uint4*>(dq) = *reinterpret_cast<const uint4*>(out);
}

// ---------------------------------------------------------------------------------------------
// Main kernel
// ---------------------------------------------------------------------------------------------


// Query blocks [begin, end) whose rows see at least one key of key block n (the transpose of the
// forward's BlockRange).
struct QueryRange {
  int begin, end;
};

__forceinline__ __device__ QueryRange query_range(const BwdKernelParams& p, const SeqSpan& seq, int n,
                                                  int block_m, int block_n) {
  const int shift = seq.seqlen_k - seq.seqlen_q;  // bottom-right alignment
  QueryRange r{0, ceil_div(seq.seqlen_q, block_m)};
  if (p.window_right >= 0) r.begin = max(0, (n * block_n - shift - p.window_right) / block_m);
  if (p.window_left >= 0) {
    const int last_key = min((n + 1) * block_n, seq.seqlen_k) - 1;
    const int last_row = last_key - shift + p.window_left;
    r.end = last_row < 0 ? 0 : min(r.end, last_row / block_m + 1);
  }
  return r;
}

// True when some element of the tile starting at (i0, j0) is hidden (window, causal, sequence end).
__forceinline__ __device__ bool tile_needs_mask(const MaskPolicy& mask, int i0, int j0, int block_m,
                                                int block_n) {
  return mask.col_begin(i0 + block_m - 1) > j0 || mask.col_end(i0) < j0 + block_n;
}

// Raw scores S = Q K^T of one tile -> probabilities P, in place, recomputed as the forward did:
// scale (or softcap), ALiBi, mask, exp(S - lse), in log2 units. `s`, `coord` and `dtanh` are
// (row, col) views; coord holds tile-local (row, col). With softcap, dtanh gets 1 - tanh^2.
// kPerElement: softcap, ALiBi or the mask (per-element work); otherwise the scale folds into the
// exponent's FFMA.
template <bool kSoftcap, bool kPerElement, int kRows, class Scores, class Coords, class DTanh>
__device__ void scores_to_probs(const BwdKernelParams& p, const MaskPolicy& mask, bool masked, int i0, int j0,
                                float slope_log2, Scores&& s, const Coords& coord, DTanh&& dtanh,
                                const float (&lse_log2)[kRows]) {
  constexpr bool kScaleInExp = !kSoftcap && !kPerElement;
  if constexpr (!kScaleInExp) {
    CUTE_UNROLL
    for (int e = 0; e < size(s); ++e) {
      if constexpr (kSoftcap) {
        const float th = tanhf(s(e) * (p.scale / p.softcap));
        dtanh(e) = 1.f - th * th;
        s(e) = th * (p.softcap * kLog2e);
      } else {
        s(e) *= p.scale_log2;
      }
    }
  }
  if constexpr (kPerElement) {
    CUTE_UNROLL
    for (int e = 0; e < size(s); ++e) {
      const int i = i0 + get<0>(coord(e)), j = j0 + get<1>(coord(e));
      s(e) -= slope_log2 * fabsf(float(i + mask.seqlen_k - mask.seqlen_q - j));
    }
    if (masked) mask.apply(s, coord, i0, j0);
  }
  const float scale = kScaleInExp ? p.scale_log2 : 1.f;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) s(r, c) = exp2f(s(r, c) * scale - lse_log2[r]);
  }
}

// P and dP (= dO V^T) -> P with dropout applied (the dV operand) and dS = P * (dP - dsum) (the dQ
// and dK operand), in place. Dropout keeps exactly the elements the forward kept (same Philox draw).
template <bool kDropout, bool kSoftcap, int kRows, class Frag, class Coords, class DTanh>
__device__ void probs_to_grads(const BwdKernelParams& p, int64_t bh, int i0, int j0, Frag&& prob, Frag&& dp,
                               const Coords& coord, const DTanh& dtanh, const float (&dsum)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(prob); ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(prob); c += 2) {  // columns c, c + 1 are adjacent keys
      bool keep[2] = {true, true};
      if constexpr (kDropout) {
        const int i = i0 + get<0>(coord(r, c)), j = j0 + get<1>(coord(r, c));
        const Philox4 draw = dropout_block(p.philox_seed, p.philox_offset, bh, i, j >> 2);
        keep[0] = philox_word_to_uniform((j & 2) ? draw.z : draw.x) >= p.dropout_p;
        keep[1] = philox_word_to_uniform((j & 2) ? draw.w : draw.y) >= p.dropout_p;
      }
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        const float pv = prob(r, c + e);
        float dpv = dp(r, c + e);
        if constexpr (kDropout) {
          dpv = keep[e] ? dpv * p.dropout_rescale : 0.f;
          prob(r, c + e) = keep[e] ? pv * p.dropout_rescale : 0.f;
        }
        float ds = pv * (dpv - dsum[r]);
        if constexpr (kSoftcap) ds *= dtanh(r, c + e);
        dp(r, c + e) = ds;
      }
    }
  }
}

// dq_accum rows += acc, two adjacent columns (one 8-byte access) at a time; with kCheckRows only rows
// < rows_left. kAtomic: fp32 atomics (many key blocks add to the same rows). Otherwise (deterministic)
// this CTA owns its split, so plain adds in a fixed order.
template <bool kAtomic, bool kCheckRows, class Dst, class Acc, class Coords>
__device__ void add_dq_pairs(const Dst& g, const Acc& acc, const Coords& coord, int rows_left) {
  CUTE_UNROLL
  for (int e = 0; e < size(acc); e += 2) {  // acc(e), acc(e + 1): one row, adjacent columns
    if (kCheckRows && get<0>(coord(e)) >= rows_left) continue;
    auto* pair = reinterpret_cast<float2*>(&g(e));
    if constexpr (kAtomic) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(pair, make_float2(acc(e), acc(e + 1)));
#else
      atomicAdd(&pair->x, acc(e)), atomicAdd(&pair->y, acc(e + 1));
#endif
    } else {
      const float2 old = *pair;
      *pair = make_float2(old.x + acc(e), old.y + acc(e + 1));
    }
  }
}

// dq_accum rows += acc (the (kBlockM, kCols) tile at dst, rows kHeadDim floats apart) for rows inside
// the sequence.
template <int kBlockM, int kCols, int kHeadDim, class Acc, class ThrMma, class Coords>
__device__ void add_dq(float* dst, const Acc& acc, const ThrMma& thr, const Coords& coord, int rows_left,
                       bool deterministic) {
  Tensor g = thr.partition_C(
      make_tensor(make_gmem_ptr(dst), Shape<Int<kBlockM>, Int<kCols>>{}, Stride<Int<kHeadDim>, _1>{}));
  if (deterministic) {
    add_dq_pairs<false, true>(g, acc, coord, rows_left);
  } else if (rows_left >= kBlockM) {  // the common case: no per-row branch around each atomic
    add_dq_pairs<true, false>(g, acc, coord, rows_left);
  } else {
    add_dq_pairs<true, true>(g, acc, coord, rows_left);
  }
}

// Writes scale * acc (an fp32 (rows, kHeadDim) mma tile) to a global tensor with the given row stride,
// two adjacent columns per store, rows < rows_left and columns < cols only.
template <class Element, int kRows, int kHeadDim, class Acc, class ThrMma, class Coords>
__device__ void store_rows(Element* dst, int64_t row_stride, const Acc& acc, const ThrMma& thr, const Coords& coord,
                           int rows_left, int cols, float scale) {
  Tensor g = thr.partition_C(
      make_tensor(make_gmem_ptr(dst), Shape<Int<kRows>, Int<kHeadDim>>{}, make_stride(row_stride, _1{})));
  CUTE_UNROLL
  for (int e = 0; e < size(acc); e += 2) {
    if (get<0>(coord(e)) < rows_left && get<1>(coord(e)) < cols) {
      __align__(4) Element pair[2] = {Element(acc(e) * scale), Element(acc(e + 1) * scale)};
      *reinterpret_cast<uint32_t*>(&g(e)) = *reinterpret_cast<uint32_t*>(pair);
    }
  }
}

// The backward's shared memory: Q stages | dO | K | V | P | dS, with the transposed views.
template <class Traits>
struct BwdSmem {
  using Element = typename Traits::Element;
  Element* base;
  __device__ explicit BwdSmem(char* raw) : base(reinterpret_cast<Element*>(raw)) {}

  __device__ Element* q_ptr(int stage) const { return base + stage * Traits::kQElems; }
  __device__ Element* do_ptr() const { return base + Traits::kQStages * Traits::kQElems; }
  __device__ Element* k_ptr() const { return do_ptr() + Traits::kQElems; }
  __device__ Element* v_ptr() const { return k_ptr() + Traits::kKElems; }
  __device__ Element* p_ptr() const { return v_ptr() + Traits::kKElems; }
  __device__ Element* ds_ptr() const { return p_ptr() + Traits::kPElems; }

  __device__ auto Q(int stage) const { return make_tensor(make_smem_ptr(q_ptr(stage)), typename Traits::SmemLayoutQ{}); }
  __device__ auto Qt(int stage) const { return make_tensor(make_smem_ptr(q_ptr(stage)), typename Traits::SmemLayoutQt{}); }
  __device__ auto dO() const { return make_tensor(make_smem_ptr(do_ptr()), typename Traits::SmemLayoutQ{}); }
  __device__ auto dOt() const { return make_tensor(make_smem_ptr(do_ptr()), typename Traits::SmemLayoutQt{}); }
  __device__ auto K() const { return make_tensor(make_smem_ptr(k_ptr()), typename Traits::SmemLayoutK{}); }
  __device__ auto Kt() const { return make_tensor(make_smem_ptr(k_ptr()), typename Traits::SmemLayoutKt{}); }
  __device__ auto V() const { return make_tensor(make_smem_ptr(v_ptr()), typename Traits::SmemLayoutK{}); }
  __device__ auto P() const { return make_tensor(make_smem_ptr(p_ptr()), typename Traits::SmemLayoutP{}); }
  __device__ auto Pt() const { return make_tensor(make_smem_ptr(p_ptr()), typename Traits::SmemLayoutPt{}); }
  __device__ auto dS() const { return make_tensor(make_smem_ptr(ds_ptr()), typename Traits::SmemLayoutP{}); }
  __device__ auto dSt() const { return make_tensor(make_smem_ptr(ds_ptr()), typename Traits::SmemLayoutPt{}); }
};

// One key block n of kv head hk. Walks the query blocks of every query head of the group (GQA), so dK
// and dV are reduced over the group on chip, in a fixed order.
//   per step: wait Q, dO | prefetch next Q | S = Q K^T, dP = dO V^T | P, dS -> smem | dV += P^T dO |
//             prefetch next dO | dQ_accum += dS K | dK += dS^T Q
template <class Traits, bool kDropout, bool kSoftcap>
__device__ void bwd_key_block(const BwdKernelParams& p, const SeqSpan& seq, int b, int hk, int n, int split,
                              char* smem_raw) {
  using Element = typename Traits::Element;
  constexpr int M = Traits::kBlockM, N = Traits::kBlockN, D = Traits::kHeadDim, kQStages = Traits::kQStages;
  const int tid = threadIdx.x;
  const int group = p.num_heads / p.num_heads_k;
  const QueryRange range = query_range(p, seq, n, M, N);
  const int blocks_per_head = max(range.end - range.begin, 0);
  const int steps = blocks_per_head * group;
  // (query head, first row) of a step; steps walk the query blocks of each head of the group in turn.
  struct StepPos {
    int h, i0;
  };
  auto next_pos = [&](StepPos s) {
    s.i0 += M;
    if (s.i0 >= range.end * M) s = {s.h + 1, range.begin * M};
    return s;
  };
  const MaskPolicy mask{seq.seqlen_q, seq.seqlen_k, p.window_left, p.window_right};
  const BwdSmem<Traits> smem(smem_raw);

  // Global -> shared: always the zero-filling cp.async with a per-chunk predicate (row < rows_left,
  // column < head_dim), one instruction per 16-byte chunk. (A branch between a plain and a predicated
  // copy gets if-converted into both, issued back to back.)
  typename Traits::GmemCopyAsyncZfill g2s;
  auto g2s_thr = g2s.get_thread_slice(tid);
  Tensor cQ = g2s_thr.partition_S(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
  Tensor cK = g2s_thr.partition_S(make_identity_tensor(Shape<Int<N>, Int<D>>{}));
  auto load = [&](const void* src, int64_t offset, int64_t row_stride, auto rows, auto&& dst, const auto& coord,
                  int rows_left) {
    Tensor g = make_tensor(make_gmem_ptr(static_cast<const Element*>(src) + offset), make_shape(rows, Int<D>{}),
                           make_stride(row_stride, _1{}));
    copy_zfill(g2s, g2s_thr.partition_S(g), g2s_thr.partition_D(dst), coord, rows_left, p.head_dim);
  };
  auto load_q = [&](StepPos s, int stage) {
    const int64_t offset = seq.q_base(b, p.q_batch, p.q_row) + s.i0 * p.q_row + s.h * p.q_head;
    load(p.q, offset, p.q_row, Int<M>{}, smem.Q(stage), cQ, seq.seqlen_q - s.i0);
  };
  auto load_do = [&](StepPos s) {
    const int64_t offset = seq.q_base(b, p.do_batch, p.do_row) + s.i0 * p.do_row + s.h * p.do_head;
    load(p.dout, offset, p.do_row, Int<M>{}, smem.dO(), cQ, seq.seqlen_q - s.i0);
  };

  // Tensor-core operands: fragments and their shared-memory sources.
  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmadKV mma_dkv;
  typename Traits::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  auto ld_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto ld_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto ld_a_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto ld_b_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto ld_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
  auto ld_b_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dq);
  Tensor rQ = thr_sdp.partition_fragment_A(smem.Q(0));
  Tensor rK = thr_sdp.partition_fragment_B(smem.K());
  Tensor rdO = thr_sdp.partition_fragment_A(smem.dO());
  Tensor rV = thr_sdp.partition_fragment_B(smem.V());
  Tensor rPt = thr_dkv.partition_fragment_A(smem.Pt());
  Tensor rdOt = thr_dkv.partition_fragment_B(smem.dOt());
  Tensor rdSt = thr_dkv.partition_fragment_A(smem.dSt());
  Tensor rQt = thr_dkv.partition_fragment_B(smem.Qt(0));
  Tensor rdS = thr_dq.partition_fragment_A(smem.dS());
  constexpr int kDqCols = Traits::kDqCols;
  auto kt_chunk = [&](int c) { return local_tile(smem.Kt(), Shape<Int<kDqCols>, Int<N>>{}, make_coord(c, 0)); };
  Tensor rKt = thr_dq.partition_fragment_B(kt_chunk(0));
  Tensor ssK = ld_b_sdp.get_thread_slice(tid).partition_S(smem.K());
  Tensor ssV = ld_b_sdp.get_thread_slice(tid).partition_S(smem.V());
  Tensor ssdO = ld_a_sdp.get_thread_slice(tid).partition_S(smem.dO());
  Tensor ssPt = ld_a_dkv.get_thread_slice(tid).partition_S(smem.Pt());
  Tensor ssdOt = ld_b_dkv.get_thread_slice(tid).partition_S(smem.dOt());
  Tensor ssdSt = ld_a_dkv.get_thread_slice(tid).partition_S(smem.dSt());
  Tensor ssdS = ld_a_dq.get_thread_slice(tid).partition_S(smem.dS());
  auto st_pds = make_tiled_copy_C(typename Traits::SmemCopyAtomAccum{}, mma_sdp);
  auto st_pds_thr = st_pds.get_thread_slice(tid);
  Tensor ssP_st = st_pds_thr.partition_D(smem.P());
  Tensor ssdS_st = st_pds_thr.partition_D(smem.dS());

  // Tile-local (row, col) of this thread's accumulator elements.
  Tensor cS = rowcol(thr_sdp.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{})));
  Tensor cdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<M>, Int<kDqCols>>{}));
  Tensor cdK = thr_dkv.partition_C(make_identity_tensor(Shape<Int<N>, Int<D>>{}));
  constexpr int kRows = decltype(size<0>(cS))::value;

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<N>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<N>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);

  __syncthreads();  // shared memory may still be read by this CTA's previous key block
  const int j0 = n * N;
  const StepPos first{hk * group, range.begin * M};
  if (steps > 0) {
    load(p.k, seq.k_base(b, p.k_batch, p.k_row) + j0 * p.k_row + hk * p.k_head, p.k_row, Int<N>{}, smem.K(), cK,
         seq.seqlen_k - j0);
    load(p.v, seq.k_base(b, p.v_batch, p.v_row) + j0 * p.v_row + hk * p.v_head, p.v_row, Int<N>{}, smem.V(), cK,
         seq.seqlen_k - j0);
    load_q(first, 0);
    cp_async_fence();
    load_do(first);
    cp_async_fence();
  }

  StepPos pos = first;
  for (int step = 0; step < steps; ++step) {
    const int h = pos.h, i0 = pos.i0, stage = step % kQStages;
    const StepPos next = next_pos(pos);
    const int64_t lse_base = seq.lse_base(p, b, h);
    float lse_log2[kRows], dsum[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int i = i0 + get<0>(cS(r, 0));
      lse_log2[r] = i < seq.seqlen_q ? p.lse[lse_base + i] * kLog2e : INFINITY;
      dsum[r] = i < seq.seqlen_q ? p.dsum[lse_base + i] : 0.f;
    }
    const float slope_log2 = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e : 0.f;

    cp_async_wait<0>();
    __syncthreads();
    if (kQStages > 1 && step + 1 < steps) {
      load_q(next, (step + 1) % kQStages);
      cp_async_fence();
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<M>, Int<N>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<M>, Int<N>>{});
    Tensor dtanh = make_fragment_like(acc_s);
    clear(acc_s);
    clear(acc_dp);
    gemm_smem<true>(acc_s, rQ, rK, ld_a_sdp.get_thread_slice(tid).partition_S(smem.Q(stage)), ssK, mma_sdp,
                    ld_a_sdp, ld_b_sdp);
    gemm_smem<true>(acc_dp, rdO, rV, ssdO, ssV, mma_sdp, ld_a_sdp, ld_b_sdp);

    const bool masked = tile_needs_mask(mask, i0, j0, M, N);
    // Softcap is per element anyway; with dropout, one scores path keeps the kernel's registers in check.
    constexpr bool kPerElementAlways = kSoftcap || kDropout;
    if (kPerElementAlways || masked || p.alibi_slopes != nullptr) {
      scores_to_probs<kSoftcap, true>(p, mask, masked, i0, j0, slope_log2, rowcol(acc_s), cS, rowcol(dtanh), lse_log2);
    } else {
      scores_to_probs<kSoftcap, false>(p, mask, masked, i0, j0, slope_log2, rowcol(acc_s), cS, rowcol(dtanh), lse_log2);
    }
    probs_to_grads<kDropout, kSoftcap>(p, int64_t(b) * p.num_heads + h, i0, j0, rowcol(acc_s), rowcol(acc_dp), cS,
                                       rowcol(dtanh), dsum);
    copy(st_pds, st_pds_thr.retile_S(convert_fragment<Element>(acc_s)), ssP_st);
    copy(st_pds, st_pds_thr.retile_S(convert_fragment<Element>(acc_dp)), ssdS_st);
    __syncthreads();

    gemm_smem<true>(acc_dv, rPt, rdOt, ssPt, ssdOt, mma_dkv, ld_a_dkv, ld_b_dkv);
    __syncthreads();  // dO is free: fetch the next one while dQ and dK compute
    if (step + 1 < steps) {
      load_do(next);
      cp_async_fence();
    }

    float* dq_rows = p.dq_accum + split * p.dq_accum_split_stride + (h * p.q_rows + seq.q_row0 + i0) * D;
    CUTE_UNROLL
    for (int c = 0; c < D / kDqCols; ++c) {
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<M>, Int<kDqCols>>{});
      clear(acc_dq);
      gemm_smem<true>(acc_dq, rdS, rKt, ssdS, ld_b_dq.get_thread_slice(tid).partition_S(kt_chunk(c)), mma_dq,
                      ld_a_dq, ld_b_dq);
      add_dq<M, kDqCols, D>(dq_rows + c * kDqCols, acc_dq, thr_dq, cdQ, seq.seqlen_q - i0, p.deterministic);
    }

    gemm_smem<true>(acc_dk, rdSt, rQt, ssdSt, ld_b_dkv.get_thread_slice(tid).partition_S(smem.Qt(stage)), mma_dkv,
                    ld_a_dkv, ld_b_dkv);
    if (kQStages == 1 && step + 1 < steps) {
      __syncthreads();
      load_q(next, 0);
      cp_async_fence();
    }
    pos = next;
  }

  auto* dk = static_cast<Element*>(p.dk) + seq.k_base(b, p.dk_batch, p.dk_row) + j0 * p.dk_row + hk * p.dk_head;
  auto* dv = static_cast<Element*>(p.dv) + seq.k_base(b, p.dv_batch, p.dv_row) + j0 * p.dv_row + hk * p.dv_head;
  store_rows<Element, N, D>(dk, p.dk_row, acc_dk, thr_dkv, cdK, seq.seqlen_k - j0, p.head_dim, p.scale);
  store_rows<Element, N, D>(dv, p.dv_row, acc_dv, thr_dkv, cdK, seq.seqlen_k - j0, p.head_dim, 1.f);
}

// Grid (key-block slots, batch, kv heads). Non-deterministic: one slot per key block. Deterministic:
// num_splits slots, slot s walking key blocks s, s + num_splits, ... and owning dQ split s.
template <class Traits, bool kDropout, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kNThreads, 1) bwd_main_kernel(const __grid_constant__ BwdKernelParams p) {
  extern __shared__ __align__(128) char smem[];
  const int b = blockIdx.y, hk = blockIdx.z;
  const SeqSpan seq(p, b);
  const int num_n = ceil_div(seq.seqlen_k, Traits::kBlockN);
  for (int n = blockIdx.x; n < num_n; n += gridDim.x) {
    bwd_key_block<Traits, kDropout, kSoftcap>(p, seq, b, hk, n, p.deterministic ? blockIdx.x : 0, smem);
  }
}

}  // namespace flash_attention::sm80
