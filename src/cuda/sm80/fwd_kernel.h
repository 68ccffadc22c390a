// The sm80 forward kernel: one CTA computes O and the LSE of kBlockM query rows of one (batch, head).
//
//   prologue   Q and the first kStages-1 K/V tiles start streaming in (cp.async, one group each).
//   main loop  key blocks from the right (the diagonal / bounds end, which needs the mask) to the left:
//                wait K_n and V_n (V_0: just before its use), one barrier; issue the loads kStages-1
//                blocks ahead; S = Q K_n^T (ldmatrix + mma.sync); extras (softcap, ALiBi); mask (only
//                on blocks that need it); online softmax; dropout; P -> 16 bit in registers; O += P V_n.
//   epilogue   O / rowsum -> smem -> 16-byte coalesced stores; LSE per row.
// A CTA whose rows see no key at all skips the loop and writes O = 0, LSE = +inf.
#pragma once

#include <cute/tensor.hpp>

#include "common/philox.h"
#include "cuda/sm80/copy.h"
#include "cuda/sm80/fwd_args.h"
#include "cuda/sm80/kernel_traits.h"
#include "cuda/sm80/mask.h"
#include "cuda/sm80/softmax.h"
#include "cuda/sm80/utils.h"

namespace flash_attention::sm80 {

// Softcap and ALiBi on one block of scores (rows x cols views); row0 / col0 locate the block.
template <class Scores, class Coords>
__device__ void apply_score_extras(Scores& s, const Coords& coords, const FwdArgs& args, float alibi_slope,
                                   int row0, int col0, int seqlen_q, int seqlen_k) {
  if (args.softcap) {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(s); ++i) s(i) = tanhf(s(i) * args.softcap_prescale);
  }
  if (args.alibi_slopes != nullptr) {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(s); ++i) {
      const int row = row0 + cute::get<0>(coords(i));
      const int col = col0 + cute::get<1>(coords(i));
      s(i) -= alibi_slope * float(abs(row + seqlen_k - seqlen_q - col));
    }
  }
}

// Zeroes dropped probabilities. Keys 4t .. 4t + 3 share one Philox draw (word j % 4 for key j). In
// the m16n8 accumulator layout lanes 2k and 2k + 1 hold the same row and the two halves (keys 4t, 4t + 1
// and 4t + 2, 4t + 3) of every such group, so each lane of the pair computes every other draw and
// hands its partner the two words the partner needs: half the Philox work, two shuffles per draw.
template <class Probs, class Coords>
__device__ void apply_dropout(Probs& p, const Coords& coords, const FwdArgs& args, int64_t bh, int row0, int col0) {
  constexpr int kCols = decltype(cute::size<1>(p))::value;
  static_assert(kCols % 4 == 0, "pairs of adjacent key pairs per row");
  const bool odd = threadIdx.x & 1;
  auto drop = [&](float& x, uint32_t word) {
    if (philox_word_to_uniform(word) < args.dropout_p) x = 0.f;
  };
  CUTE_UNROLL
  for (int r = 0; r < cute::size<0>(p); ++r) {
    const int64_t i = row0 + cute::get<0>(coords(r, 0));
    CUTE_UNROLL
    for (int c = 0; c < kCols; c += 4) {  // key pairs (c, c + 1) and (c + 2, c + 3) of this lane
      const int j_first = cute::get<1>(coords(r, c)), j_second = cute::get<1>(coords(r, c + 2));
      const int64_t j = col0 + (odd ? j_second : j_first);  // the pair this lane draws for
      const Philox4 draw = dropout_block(args.philox_seed, args.philox_offset, bh, i, j >> 2);
      const bool high = j & 2;  // this lane's keys use words z, w; the partner's x, y (and vice versa)
      const uint32_t own0 = high ? draw.z : draw.x, own1 = high ? draw.w : draw.y;
      const uint32_t got0 = __shfl_xor_sync(0xffffffffu, high ? draw.x : draw.z, 1);
      const uint32_t got1 = __shfl_xor_sync(0xffffffffu, high ? draw.y : draw.w, 1);
      drop(p(r, c), odd ? got0 : own0);
      drop(p(r, c + 1), odd ? got1 : own1);
      drop(p(r, c + 2), odd ? own0 : got0);
      drop(p(r, c + 3), odd ? own1 : got1);
    }
  }
}

template <class Traits, bool kExtras>
__global__ void __launch_bounds__(Traits::kNThreads, 1) fwd_kernel(const __grid_constant__ FwdArgs args) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);  // heaviest (causal) blocks first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const SeqInfo seq(args, b);
  const int row0 = m_block * kBlockM;
  if (row0 >= seq.seqlen_q) return;
  const int h_k = h / (args.num_heads / args.num_heads_k);
  const int tid = threadIdx.x;

  const MaskPolicy mask{seq.seqlen_q, seq.seqlen_k, args.window_left, args.window_right};
  const BlockRange range = mask.template block_range<kBlockM, kBlockN>(m_block);
  const int n_iters = range.empty() ? 0 : range.n_max - range.n_min;

  // Global views of this (b, h): the head dim is addressed up to kHeadDim, loads are predicated on head_dim.
  const auto* q_ptr = static_cast<const Element*>(args.q) +
                      seq.q_offset(args.q_batch_stride, args.q_row_stride, b) + int64_t(h) * args.q_head_stride;
  const auto* k_ptr = static_cast<const Element*>(args.k) +
                      seq.k_offset(args.k_batch_stride, args.k_row_stride, b) + int64_t(h_k) * args.k_head_stride;
  const auto* v_ptr = static_cast<const Element*>(args.v) +
                      seq.k_offset(args.v_batch_stride, args.v_row_stride, b) + int64_t(h_k) * args.v_head_stride;
  auto* o_ptr = static_cast<Element*>(args.out) + seq.q_offset(args.o_batch_stride, args.o_row_stride, b) +
                int64_t(h) * args.o_head_stride;
  auto rows_q = make_shape(seq.seqlen_q, Int<kHeadDim>{});
  auto rows_k = make_shape(seq.seqlen_k, Int<kHeadDim>{});
  Tensor gQ = local_tile(make_tensor(make_gmem_ptr(q_ptr), rows_q, make_stride(args.q_row_stride, _1{})),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gO = local_tile(make_tensor(make_gmem_ptr(o_ptr), rows_q, make_stride(args.o_row_stride, _1{})),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(make_tensor(make_gmem_ptr(k_ptr), rows_k, make_stride(args.k_row_stride, _1{})),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (N, D, n_blocks)
  Tensor gV = local_tile(make_tensor(make_gmem_ptr(v_ptr), rows_k, make_stride(args.v_row_stride, _1{})),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});

  // Global -> shared.
  typename Traits::GmemCopyAsync g2s;
  typename Traits::GmemCopyAsyncZfill g2s_zfill;
  auto g2s_thr = g2s.get_thread_slice(tid);
  Tensor tQgQ = g2s_thr.partition_S(gQ);
  Tensor tQsQ = g2s_thr.partition_D(sQ);
  Tensor tQcQ = g2s_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKgK = g2s_thr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n_blocks)
  Tensor tKsK = g2s_thr.partition_D(sK);  // (CPY, CPY_N, CPY_K, stages)
  Tensor tVgV = g2s_thr.partition_S(gV);
  Tensor tVsV = g2s_thr.partition_D(sV);
  Tensor tKcK = g2s_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  // K then V of the iter-th visited block, each its own cp.async group. Blocks are visited from the
  // right, so only the first one (n_max - 1, loaded in the prologue) can have rows past seqlen_k; the
  // others need a column predicate at most (padded head dims), which keeps the loop's loads short.
  const bool even_head_dim = args.head_dim == kHeadDim;
  auto k_next = tKgK(_, _, _, range.n_max - 1).data();  // this thread's first K / V element of the last load
  auto v_next = tVgV(_, _, _, range.n_max - 1).data();
  const auto k_copy_layout = tKgK.layout()(_, _, _, 0);  // (CPY, CPY_N, CPY_K) of one block
  const auto v_copy_layout = tVgV.layout()(_, _, _, 0);
  auto load_kv = [&](int iter, auto first) __attribute__((always_inline)) {
    if (iter < n_iters) {
      const int n_block = range.n_max - 1 - iter;
      const int slot = iter % kStages;
      if constexpr (decltype(first)::value) {
        const int rows = seq.seqlen_k - n_block * kBlockN;
        const bool in_bounds = even_head_dim && rows >= kBlockN;
        load_tile(g2s, g2s_zfill, tKgK(_, _, _, n_block), tKsK(_, _, _, slot), tKcK, rows, args.head_dim, in_bounds);
        cp_async_fence();
        load_tile(g2s, g2s_zfill, tVgV(_, _, _, n_block), tVsV(_, _, _, slot), tKcK, rows, args.head_dim, in_bounds);
      } else {
        k_next = k_next + (-kBlockN * args.k_row_stride);  // pointer bumps: few registers live across blocks
        v_next = v_next + (-kBlockN * args.v_row_stride);
        copy_zfill_cols(g2s_zfill, make_tensor(k_next, k_copy_layout), tKsK(_, _, _, slot), tKcK, args.head_dim);
        cp_async_fence();
        copy_zfill_cols(g2s_zfill, make_tensor(v_next, v_copy_layout), tVsV(_, _, _, slot), tKcK, args.head_dim);
      }
    } else {
      cp_async_fence();
    }
    cp_async_fence();
  };

  // Shared -> registers, tensor-core GEMMs.
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK(_, _, 0));
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt(_, _, 0));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  auto s2r_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto s2r_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto s2r_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  Tensor tSsQ = s2r_q.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsK = s2r_k.get_thread_slice(tid).partition_S(sK);    // (CPY, N, K, stages)
  Tensor tOsVt = s2r_v.get_thread_slice(tid).partition_S(sVt);  // (CPY, D, N, stages)

  // (row, col) coordinates of this thread's score and output elements, tile-local.
  Tensor tScS = rowcol(thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{})));
  Tensor tOcO = rowcol(thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{})));
  Tensor acc_o_rc = rowcol(acc_o);
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;

  float alibi_slope = 0.f;
  if (kExtras && args.alibi_slopes != nullptr) {
    alibi_slope = args.alibi_slopes[int64_t(b) * args.alibi_batch_stride + h] / args.score_scale;
  }
  const int64_t bh = int64_t(b) * args.num_heads + h;

  if (n_iters > 0) {
    load_tile(g2s, g2s_zfill, tQgQ, tQsQ, tQcQ, seq.seqlen_q - row0, args.head_dim, false);
    cp_async_fence();
    load_kv(0, cute::true_type{});
    CUTE_UNROLL
    for (int s = 1; s < kStages - 1; ++s) load_kv(s, cute::false_type{});
    if constexpr (Traits::kQInRegs) {
      cp_async_wait<2 * (kStages - 1)>();
      __syncthreads();
      copy(s2r_q, tSsQ, s2r_q.get_thread_slice(tid).retile_D(tSrQ));
    }
  }

  auto step = [&](auto masked, int iter) __attribute__((always_inline)) {
    constexpr bool kMasked = decltype(masked)::value;
    const int n_block = range.n_max - 1 - iter;
    const int slot = iter % kStages;
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    // K and V of this block have landed (they were issued together a whole block ago), for every
    // thread; and every warp is done with block iter-1, whose slot the next load reuses. One barrier
    // per block: the K/V slots are double-buffered. Only the first block waits for its V apart, after
    // the S GEMM, so that the prologue's V load overlaps that GEMM.
    if (iter == 0) {
      cp_async_wait<2 * kStages - 3>();
    } else {
      cp_async_wait<2 * (kStages - 2)>();
    }
    __syncthreads();
    load_kv(iter + kStages - 1, cute::false_type{});
    gemm_smem<!Traits::kQInRegs>(acc_s, tSrQ, tSrK, tSsQ, tSsK(_, _, _, slot), mma, s2r_q, s2r_k);

    Tensor s = rowcol(acc_s);
    const int col0 = n_block * kBlockN;
    if constexpr (kExtras) {
      apply_score_extras(s, tScS, args, alibi_slope, row0, col0, seq.seqlen_q, seq.seqlen_k);
    }
    if constexpr (kMasked) mask.apply(s, tScS, row0, col0);
    softmax.template update<kMasked>(s, acc_o_rc, args.scale_log2);
    if constexpr (kExtras) {
      if (args.dropout_p > 0.f) apply_dropout(s, tScS, args, bh, row0, col0);
    }
    Tensor p = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(p.data(), acc_as_a_layout(p.layout()));
    if (iter == 0) {
      cp_async_wait<2 * (kStages - 1)>();
      __syncthreads();
    }
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt(_, _, _, slot), mma, s2r_v);
  };

  for (int iter = 0; iter < n_iters; ++iter) {
    if (range.needs_mask(range.n_max - 1 - iter)) {
      step(cute::true_type{}, iter);
    } else {
      step(cute::false_type{}, iter);
    }
  }

  // Epilogue: O goes through sQ once every warp is done reading Q (the barrier below).
  float lse[kRows];
  const float out_scale = (kExtras && args.dropout_p > 0.f) ? args.dropout_rescale : 1.f;
  softmax.finalize(acc_o_rc, args.score_scale, out_scale, lse);

  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  auto r2s = make_tiled_copy_C(typename Traits::SmemCopyAtomAccum{}, mma);
  auto r2s_thr = r2s.get_thread_slice(tid);
  __syncthreads();
  copy(r2s, r2s_thr.retile_S(rO), r2s_thr.partition_D(sO));

  float* lse_ptr = args.lse + seq.lse_offset(args, b, h);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = row0 + get<0>(tOcO(r, 0));
    if (get<1>(tOcO(r, 0)) == 0 && row < seq.seqlen_q) lse_ptr[row] = lse[r];
  }
  __syncthreads();

  typename Traits::GmemCopyStore s2g;
  auto s2g_thr = s2g.get_thread_slice(tid);
  Tensor tOsO = s2g_thr.partition_S(sO);
  Tensor tOgO = s2g_thr.partition_D(gO);
  Tensor tOrO = make_fragment_like(tOgO);
  copy(s2g, tOsO, tOrO);
  store_tile(s2g, tOrO, tOgO, tQcQ, seq.seqlen_q - row0, args.head_dim);
}

}  // namespace flash_attention::sm80
