// The sm90 forward kernel: persistent CTAs (one per SM) walk a static schedule of
// (query block, head, batch) tiles (see FwdArgs / Tile).
//
//   warpgroup 0       producer: one thread issues TMA loads of Q per tile (as soon as the previous
//                     tile's last Q K^T is done) and of K/V per key block into a `kStages`-deep ring of
//                     shared-memory buffers (mbarrier pipelines, continuing across tiles); setmaxnreg dec.
//   warpgroups 1..W   consumers: 64 query rows each; setmaxnreg inc. Per key block (walked from the
//                     last one down, so masked blocks come first):
//                       S = Q K^T (wgmma SS, async) ... P V of the previous block (wgmma RS, async),
//                       softmax of S overlaps the P V wgmma; P stays in registers.
//                     Consumer warpgroups take turns issuing wgmma (named barriers), so one's softmax
//                     runs while the other's GEMMs occupy the tensor cores.
//   epilogue          O / rowsum -> bf16/fp16 -> shared memory (stmatrix) -> global memory by one TMA
//                     store per warpgroup, which the next tile does not wait for; LSE from the quad
//                     leader. (Pairs stored straight from registers cost 4-13k cycles a tile.)
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_conversion.h>

#include "cuda/sm90/fwd_fp8.h"
#include "cuda/sm90/fwd_traits.h"
#include "cuda/sm90/softmax.h"

namespace flash_attention::sm90 {

CUTE_DEVICE void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
CUTE_DEVICE void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// TMA pipeline parameters of a warp-specialised CTA: warpgroup 0 produces (thread 0 issues the loads),
// the other warpgroups' `consumers` threads consume; `bytes` land per stage.
template <class Pipeline>
CUTE_DEVICE typename Pipeline::Params warp_specialized_params(int warp_group, uint32_t bytes, int consumers) {
  typename Pipeline::Params pp;
  pp.transaction_bytes = bytes;
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = consumers;
  return pp;
}

// Consumer warpgroups issue their GEMMs in turn: wg waits for its turn, issues, hands the turn on.
// Barrier ids 1..W; 0 is __syncthreads.
template <int kWGs>
struct TurnTaking {
  static CUTE_DEVICE void start(int wg) {
    if (kWGs > 1 && wg == kWGs - 1) named_bar_arrive(1, 256);
  }
  static CUTE_DEVICE void wait(int wg) {
    if (kWGs > 1) named_bar_sync(1 + wg, 256);
  }
  static CUTE_DEVICE void pass(int wg) {
    if (kWGs > 1) named_bar_arrive(1 + (wg + 1) % kWGs, 256);
  }
};

// Issues one warpgroup GEMM (all k-blocks) as one wgmma batch; does not wait for it. A register
// operand must be fenced by the caller (warpgroup_fence_operand on its owning fragment).
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
CUTE_DEVICE void wgmma_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
}

template <class Element, class TS, class TP>
CUTE_DEVICE void convert_to(TS const& src, TP& dst) {
  constexpr int N = decltype(size(src))::value;
  cutlass::NumericArrayConverter<Element, float, N> conv;
  *reinterpret_cast<cutlass::Array<Element, N>*>(dst.data()) =
      conv(*reinterpret_cast<cutlass::Array<float, N> const*>(src.data()));
}

// Where the tile sits in its sequence, and which key blocks it must visit.
struct BlockInfo {
  int offset_q = 0, offset_k = 0;  // varlen row offsets
  int seqlen_q = 0, seqlen_k = 0;
  int n_begin = 0, n_end = 0;      // key blocks [n_begin, n_end)

  template <int kBlockM, int kBlockN>
  CUTE_DEVICE static BlockInfo make(const FwdArgs& a, int m_block, int b) {
    BlockInfo bi;
    if (a.is_varlen()) {
      bi.offset_q = a.cu_seqlens_q[b];
      bi.offset_k = a.cu_seqlens_k[b];
      bi.seqlen_q = a.cu_seqlens_q[b + 1] - bi.offset_q;
      bi.seqlen_k = a.cu_seqlens_k[b + 1] - bi.offset_k;
    } else {
      bi.seqlen_q = a.seqlen_q;
      bi.seqlen_k = a.seqlen_k;
    }
    const int diag = bi.seqlen_k - bi.seqlen_q;
    const int row_lo = m_block * kBlockM;
    const int row_hi = min(row_lo + kBlockM, bi.seqlen_q) - 1;
    bi.n_end = (bi.seqlen_k + kBlockN - 1) / kBlockN;
    if (a.window_right >= 0) {
      const int last_key = row_hi + diag + a.window_right;  // last visible key of the tile
      bi.n_end = min(bi.n_end, last_key < 0 ? 0 : last_key / kBlockN + 1);
    }
    if (a.window_left >= 0) {
      const int first_key = row_lo + diag - a.window_left;
      bi.n_begin = first_key <= 0 ? 0 : first_key / kBlockN;
    }
    return bi;
  }

  // Does key block n contain a key some row of the tile must not see?
  template <int kBlockM, int kBlockN>
  CUTE_DEVICE bool needs_mask(const FwdArgs& a, int m_block, int n) const {
    const int diag = seqlen_k - seqlen_q;
    const int col_lo = n * kBlockN, col_hi = col_lo + kBlockN - 1;
    const int row_lo = m_block * kBlockM, row_hi = row_lo + kBlockM - 1;
    return col_hi >= seqlen_k || (a.window_right >= 0 && col_hi > row_lo + diag + a.window_right) ||
           (a.window_left >= 0 && col_lo < row_hi + diag - a.window_left);
  }
};

// Sets scores of keys row i may not see to -inf. `coord` holds (row, col) within the tile.
template <class TS, class TC>
CUTE_DEVICE void apply_mask(TS& s, TC const& coord, const FwdArgs& a, const BlockInfo& bi,
                            int row0, int col0) {
  const int diag = bi.seqlen_k - bi.seqlen_q;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const int i = row0 + get<0>(coord(r, 0));
    const int hi = a.window_right >= 0 ? min(bi.seqlen_k, i + diag + a.window_right + 1) : bi.seqlen_k;
    const int lo = a.window_left >= 0 ? i + diag - a.window_left : 0;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      const int j = col0 + get<1>(coord(r, c));
      if (j >= hi || j < lo) s(r, c) = -INFINITY;
    }
  }
}

template <class Element>
CUTE_DEVICE Element* out_tile_ptr(const FwdArgs& a, const BlockInfo& bi, int h, int b) {
  return static_cast<Element*>(a.out) + int64_t(h) * a.out_head +
         (a.is_varlen() ? int64_t(bi.offset_q) * a.out_row : int64_t(b) * a.out_batch);
}

CUTE_DEVICE float* lse_row_ptr(const FwdArgs& a, const BlockInfo& bi, int h, int b) {
  return a.is_varlen() ? a.lse + int64_t(h) * a.total_q + bi.offset_q
                       : a.lse + (int64_t(b) * a.num_heads + h) * a.seqlen_q;
}

// A tile whose rows see no key at all: out = 0, lse = +inf; written by threads [0, threads).
template <class Traits>
CUTE_DEVICE void write_empty_tile(const FwdArgs& a, const BlockInfo& bi, int h, int b, int m_block,
                                  int tid, int threads) {
  using ElementOut = typename Traits::ElementOut;
  ElementOut* out = out_tile_ptr<ElementOut>(a, bi, h, b);
  float* lse = lse_row_ptr(a, bi, h, b);
  const int row0 = m_block * Traits::kBlockM;
  const int rows = min(Traits::kBlockM, bi.seqlen_q - row0);
  const int chunks = a.head_dim / 8;
  for (int idx = tid; idx < rows * chunks; idx += threads) {
    const int i = row0 + idx / chunks;
    *reinterpret_cast<uint4*>(out + int64_t(i) * a.out_row + (idx % chunks) * 8) = make_uint4(0, 0, 0, 0);
  }
  for (int r = tid; r < rows; r += threads) lse[row0 + r] = INFINITY;
}

// Keeps a shared-memory access between the mbarrier operations around it (their asm has no memory clobber).
CUTE_DEVICE void compiler_fence() { asm volatile("" ::: "memory"); }

// Persistent schedule: tile t -> (query block, head, batch). See FwdArgs.
struct Tile {
  int m_block, h, b;

  CUTE_DEVICE static Tile decode(const FwdArgs& a, int t) {
    const int per_section = a.m_blocks * a.heads_per_section;
    const int first_hb = t / per_section * a.heads_per_section;
    const int within = t % per_section;
    const int size = min(a.heads_per_section, a.num_heads * a.batch - first_hb);
    const int hb = first_hb + within % size;
    return {a.m_blocks - 1 - within / size, hb % a.num_heads, hb / a.num_heads};
  }
};

// Loops over the CTA's tiles, calling fn(tile, block_info) for those with keys to visit; tiles
// whose rows see no key are written by `empty(tile, block_info)`. Run by the producer thread and by every
// consumer thread.
// Static schedule: CTAs take one tile per round, in CTA order on even rounds and reversed on odd ones (a
// heavy first tile is followed by a light one under the heaviest-first order of causal schedules).
// Dynamic schedule (a.tile_counter): tile indices come from schedule_tiles through shared memory.
template <class Traits, class Fn, class Empty>
CUTE_DEVICE void for_each_tile(const FwdArgs& a, typename Traits::SharedStorage& ss, Fn&& fn, Empty&& empty) {
  const bool dynamic = a.tile_counter != nullptr;
  int t = blockIdx.x;
  for (int i = 0;; ++i) {
    if (dynamic) {
      cutlass::arch::ClusterBarrier::wait(&ss.tile_full, i & 1);
      compiler_fence();
      t = *static_cast<volatile int*>(&ss.tile_id);
      compiler_fence();
      cutlass::arch::ClusterBarrier::arrive(&ss.tile_empty);
    } else if (i > 0) {
      t = i * gridDim.x + (i % 2 == 0 ? blockIdx.x : gridDim.x - 1 - blockIdx.x);
    }
    if (t >= a.num_tiles) return;
    const Tile tile = Tile::decode(a, t);
    const BlockInfo bi = BlockInfo::make<Traits::kBlockM, Traits::kBlockN>(a, tile.m_block, tile.b);
    if (tile.m_block * Traits::kBlockM >= bi.seqlen_q) continue;
    if (bi.n_end <= bi.n_begin) {
      empty(tile, bi);
    } else {
      fn(tile, bi);
    }
  }
}

// Dynamic schedule (a.tile_counter; one thread of the producer warpgroup's second warp): the CTA's first
// tile is blockIdx.x, each next one gridDim.x + the counter's next value, fetched while the CTA works on
// the current one, so that light and heavy tiles balance; an index is published in ss.tile_id
// (tile_full) once every reader has taken the last one (tile_empty); one past the last tile ends the loops.
template <class Traits>
CUTE_DEVICE void schedule_tiles(const FwdArgs& a, typename Traits::SharedStorage& ss) {
  int t = blockIdx.x;
  for (int i = 0;; ++i) {
    if (i > 0) cutlass::arch::ClusterBarrier::wait(&ss.tile_empty, (i - 1) & 1);
    compiler_fence();
    *static_cast<volatile int*>(&ss.tile_id) = t;
    compiler_fence();
    cutlass::arch::ClusterBarrier::arrive(&ss.tile_full);
    if (t >= a.num_tiles) return;
    t = int(gridDim.x) + atomicAdd(a.tile_counter, 1);
  }
}

// The key blocks of V as TMA loads them: (N, D, blocks), or for FP8 the V^T tiles (D, N, blocks).
template <class Traits, class TV>
CUTE_DEVICE auto v_blocks(TV const& mV, int offset_k) {
  if constexpr (Traits::kFp8) {
    return local_tile(domain_offset(make_coord(_0{}, offset_k), mV), typename Traits::TileV{}, make_coord(_0{}, _));
  } else {
    return local_tile(domain_offset(make_coord(offset_k, _0{}), mV), typename Traits::TileV{}, make_coord(_, _0{}));
  }
}

// FP8 descale of a tile: q_descale * k_descale scales the scores (inside the softcap when there is
// one), v_descale the output.
struct TileScales {
  float scale_log2, softcap_pre, out = 1.f;

  CUTE_DEVICE static TileScales make(const FwdArgs& a, const Tile& tile) {
    TileScales t{a.scale_log2, a.softcap_pre};
    const int hk = tile.h / a.heads_per_kv_head;
    const int64_t i = int64_t(tile.b) * (a.num_heads / a.heads_per_kv_head) + hk;
    const float qk = (a.q_descale ? a.q_descale[i] : 1.f) * (a.k_descale ? a.k_descale[i] : 1.f);
    if (a.softcap_pre > 0.f) {
      t.softcap_pre *= qk;
    } else {
      t.scale_log2 *= qk;
    }
    if (a.v_descale) t.out = a.v_descale[i];
    return t;
  }
};

// P in registers as the A operand of the P V wgmma, and the conversion from the S accumulator.
template <class Traits, class TS>
CUTE_DEVICE auto make_p_fragment(TS const& tSrS) {
  if constexpr (Traits::kFp8) {
    return make_fp8_p_fragment<Traits::kBlockN>();
  } else {
    return make_tensor_like<typename Traits::Element>(tSrS);
  }
}

template <class Traits, class TP>
CUTE_DEVICE auto p_as_operand_a(TP& tOrP) {
  if constexpr (Traits::kFp8) {
    return make_tensor(tOrP.data(), tOrP.layout());
  } else {
    return make_tensor(tOrP.data(), acc_as_operand_a(tOrP.layout()));
  }
}

template <class Traits, class TS, class TP>
CUTE_DEVICE void convert_p(TS const& tSrS, TP& tOrP) {
  if constexpr (Traits::kFp8) {
    convert_p_fp8(tSrS, tOrP);
  } else {
    convert_to<typename Traits::Element>(tSrS, tOrP);
  }
}

template <class Traits>
CUTE_DEVICE void producer(typename Traits::Params const& p, typename Traits::SharedStorage& ss,
                          typename Traits::Pipeline& pipe_k, typename Traits::Pipeline& pipe_v) {
  using TileQK = typename Traits::TileQK;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVLoad{});
  auto state_k = cutlass::make_producer_start_state<typename Traits::Pipeline>();
  auto state_v = state_k;
  int q_empty_phase = 0, o_empty_phase = 0;
  bool first_tile = true;

  auto load_tile = [&](const Tile& tile, const BlockInfo& bi) {
    const int hk = tile.h / p.args.heads_per_kv_head;
    const int bq = p.args.is_varlen() ? 0 : tile.b;
    Tensor mQ = p.tma_q.get_tma_tensor(p.shape_q)(_, _, tile.h, bq);
    Tensor mK = p.tma_k.get_tma_tensor(p.shape_k)(_, _, hk, bq);
    Tensor mV = p.tma_v.get_tma_tensor(p.shape_v)(_, _, hk, bq);
    Tensor gQ = local_tile(domain_offset(make_coord(bi.offset_q, _0{}), mQ), select<0, 2>(TileQK{}),
                           make_coord(tile.m_block, _0{}));                  // (M, D)
    Tensor gK = local_tile(domain_offset(make_coord(bi.offset_k, _0{}), mK), select<1, 2>(TileQK{}),
                           make_coord(_, _0{}));                             // (N, D, blocks)
    Tensor gV = v_blocks<Traits>(mV, bi.offset_k);                      // (N, D, blocks); FP8 (D, N, blocks)
    auto tq = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto tk = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto tv = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    auto& tKg = get<0>(tk);  // (TMA, blocks) global
    auto& tKs = get<1>(tk);  // (TMA, stages) shared
    auto& tVg = get<0>(tv);
    auto& tVs = get<1>(tv);

    // The Q buffer is free once both consumer warpgroups finished the previous tile's last Q K^T.
    if (!first_tile) {
      cutlass::arch::ClusterBarrier::wait(&ss.q_empty, q_empty_phase);
      q_empty_phase ^= 1;
    }
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.q_full, Traits::kTmaBytesQ);
    copy(p.tma_q.with(ss.q_full, 0), get<0>(tq), get<1>(tq));
    // Where the previous tile's O is staged in the V buffer, its store must have read it first.
    bool wait_o = Traits::kOAliasesV && p.args.has(kFwdTmaStoreO) && !first_tile;
    first_tile = false;

    // Order: K of the first block, then (K of block n, V of block n + 1): the consumer needs the next
    // K before the previous V.
    auto load_k = [&](int n) {
      pipe_k.producer_acquire(state_k);
      copy(p.tma_k.with(*pipe_k.producer_get_barrier(state_k), 0), tKg(_, n), tKs(_, state_k.index()));
      ++state_k;
    };
    auto load_v = [&](int n) {
      if (wait_o) {
        cutlass::arch::ClusterBarrier::wait(&ss.o_empty, o_empty_phase);
        o_empty_phase ^= 1;
        wait_o = false;
      }
      pipe_v.producer_acquire(state_v);
      copy(p.tma_v.with(*pipe_v.producer_get_barrier(state_v), 0), tVg(_, n), tVs(_, state_v.index()));
      ++state_v;
    };
    load_k(bi.n_end - 1);
    for (int n = bi.n_end - 2; n >= bi.n_begin; --n) {
      load_k(n);
      load_v(n + 1);
    }
    load_v(bi.n_begin);
  };
  for_each_tile<Traits>(p.args, ss, load_tile, [](const Tile&, const BlockInfo&) {});
}

// Per-warpgroup consumer state that lives across tiles.
template <class Traits>
struct ConsumerState {
  typename Traits::PipelineState read_k, read_v;
  int q_full_phase = 0;
  bool o_store_pending = false;  // this warpgroup's last O store may still be reading shared memory
};

// Named barriers of the O epilogue, after the turn-taking ones (1..W).
template <class Traits>
struct OBarriers {
  static constexpr int kAll = 1 + Traits::kConsumerWGs;                   // every consumer thread
  static CUTE_DEVICE int wg(int w) { return 2 + Traits::kConsumerWGs + w; }  // one warpgroup
};

// The warpgroup's previous O store has read its staging tile: its storing thread waits (long done by the
// next tile's first Q K^T, where this runs) and, where O is staged in the V buffer, lets the producer
// load V there again.
template <class Traits>
CUTE_DEVICE void finish_o_store(typename Traits::SharedStorage& ss, ConsumerState<Traits>& cs, int tidx) {
  if (!cs.o_store_pending) return;
  cs.o_store_pending = false;
  if (tidx % 128 == 0) {
    tma_store_wait<0>();
    if constexpr (Traits::kOAliasesV) cutlass::arch::ClusterBarrier::arrive(&ss.o_empty);
  }
}

// O (converted, in accumulator layout) -> the warpgroup's (64, D) staging tile with stmatrix -> global
// memory with one TMA store (rows and columns past the tensor are clipped). Not for varlen tiles that
// straddle the end of their sequence: the map covers every sequence.
template <class Traits, class TO>
CUTE_DEVICE void store_o_tma(typename Traits::Params const& p, typename Traits::SharedStorage& ss, TO const& tOrO,
                             const Tile& tile, const BlockInfo& bi, int tidx) {
  using ElementOut = typename Traits::ElementOut;
  using Bars = OBarriers<Traits>;
  const int wg = tidx / 128, t = tidx % 128;
  // Staged in V: both warpgroups' last P V must be done. Own buffer: this warpgroup's previous store has
  // read it (finish_o_store, by its storing thread).
  if constexpr (Traits::kOAliasesV) {
    named_bar_sync(Bars::kAll, Traits::kConsumerThreads);
  } else {
    named_bar_sync(Bars::wg(wg), 128);
  }
  Tensor sO = make_tensor(make_smem_ptr(ss.o_tile(wg)), typename Traits::SmemLayoutOWG{});
  auto r2s = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, ElementOut>{}, typename Traits::MmaPVWG{});
  auto thr = r2s.get_thread_slice(t);
  copy(r2s, thr.retile_S(tOrO), thr.partition_D(sO));
  cutlass::arch::fence_view_async_shared();  // these writes are read by TMA (async proxy)
  // The storing warp waits for the other three; they go on to the next tile.
  if (t < 32) {
    named_bar_sync(Bars::wg(wg), 128);
  } else {
    named_bar_arrive(Bars::wg(wg), 128);
  }
  if (t == 0) {
    const FwdArgs& a = p.args;
    Tensor mO = p.tma_o.get_tma_tensor(p.shape_q)(_, _, tile.h, a.is_varlen() ? 0 : tile.b);
    Tensor gO = local_tile(domain_offset(make_coord(bi.offset_q, _0{}), mO), select<0, 1>(typename Traits::TilePVWG{}),
                           make_coord(tile.m_block * Traits::kConsumerWGs + wg, _0{}));  // (64, D)
    auto thr_tma = p.tma_o.get_slice(_0{});
    copy(p.tma_o, thr_tma.partition_S(sO), thr_tma.partition_D(gO));
    tma_store_arrive();
  }
}

template <class Traits>
CUTE_DEVICE void consume_tile(typename Traits::Params const& p, typename Traits::SharedStorage& ss,
                              typename Traits::Pipeline& pipe_k, typename Traits::Pipeline& pipe_v,
                              ConsumerState<Traits>& cs, const Tile& tile, const BlockInfo& bi) {
  using ElementOut = typename Traits::ElementOut;
  using TileQK = typename Traits::TileQK;
  using TilePV = typename Traits::TilePV;
  using Turns = TurnTaking<Traits::kConsumerWGs>;
  const FwdArgs& a = p.args;
  const int tidx = threadIdx.x - 128;
  const int wg = tidx / 128;
  const int m_block = tile.m_block;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVt{});

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tidx);
  auto thr_pv = mma_pv.get_thread_slice(tidx);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stages)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N=D, MMA_K=N, stages)
  Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(TilePV{}));
  Tensor tOrO_rc = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(select<0, 1>(TileQK{})));  // (row, col) coords
  Tensor coord = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  clear(tOrO);

  constexpr int kRows = decltype(size<0>(tOrO_rc))::value;
  TileScales scales{a.scale_log2, a.softcap_pre};
  if constexpr (Traits::kFp8) scales = TileScales::make(a, tile);
  OnlineSoftmax<kRows> softmax(scales.scale_log2);
  float factor[kRows];
  bool moved = false;  // some row of this thread got a new max in the last scores()
  const float slack = !Traits::kFp8 && a.has(kFwdLazyRescale) ? kLazyRescaleSlack : 0.f;
  const bool skip_rescale = a.has(kFwdSkipRescale);
  const int row0 = m_block * Traits::kBlockM;

  // Turns the finished S = Q K^T of key block n into probabilities: softcap, mask, online softmax.
  auto scores = [&](auto& tSrS, int n) {
    if (scales.softcap_pre > 0.f) {
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) tSrS(i) = tanh_approx(tSrS(i) * scales.softcap_pre);
    }
    Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    if (bi.needs_mask<Traits::kBlockM, Traits::kBlockN>(a, m_block, n)) {
      apply_mask(s_rc, coord, a, bi, row0, n * Traits::kBlockN);
    }
    moved = softmax.update(s_rc, factor, slack);
  };
  // After the last Q K^T of the tile: the producer may load the next tile's Q.
  auto release_q_if_last = [&](int n) {
    if (n == bi.n_begin) cutlass::arch::ClusterBarrier::arrive(&ss.q_empty);
  };

  cutlass::arch::ClusterTransactionBarrier::wait(&ss.q_full, cs.q_full_phase);
  cs.q_full_phase ^= 1;

  // First key block: S only.
  Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(TileQK{}));
  Tensor tOrP0 = make_p_fragment<Traits>(tSrS);
  Tensor tOrP1 = make_p_fragment<Traits>(tSrS);  // kDoubleP only (unused, hence dropped, elsewhere)
  pipe_k.consumer_wait(cs.read_k);
  Turns::wait(wg);
  wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, cs.read_k.index()), tSrS);
  Turns::pass(wg);
  finish_o_store<Traits>(ss, cs, tidx);
  warpgroup_wait<0>();
  pipe_k.consumer_release(cs.read_k);
  ++cs.read_k;
  release_q_if_last(bi.n_end - 1);
  scores(tSrS, bi.n_end - 1);
  convert_p<Traits>(tSrS, tOrP0);

  // Steady state: S for block n while P V of block n + 1 (P in p_in) runs; block n's P goes to p_out, which
  // is p_in itself unless kDoubleP (then written before the wait: nothing in flight reads it).
  auto step = [&](int n, auto& p_in, auto& p_out) {
    Tensor tSrS_n = partition_fragment_C(mma_qk, select<0, 1>(TileQK{}));
    pipe_k.consumer_wait(cs.read_k);
    pipe_v.consumer_wait(cs.read_v);
    Turns::wait(wg);
    wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, cs.read_k.index()), tSrS_n);
    warpgroup_fence_operand(p_in);
    wgmma_gemm<false>(mma_pv, p_as_operand_a<Traits>(p_in), tOrV(_, _, _, cs.read_v.index()), tOrO);
    Turns::pass(wg);
    warpgroup_wait<1>();
    pipe_k.consumer_release(cs.read_k);
    ++cs.read_k;
    release_q_if_last(n);
    scores(tSrS_n, n);
    if constexpr (Traits::kDoubleP) convert_p<Traits>(tSrS_n, p_out);
    if constexpr (Traits::kExpsBeforePVWait) {  // the row sums, hence every exponential, before the wait
      *static_cast<volatile float*>(&ss.row_sum_sink[tidx]) = softmax.row_sum[0] + softmax.row_sum[kRows - 1];
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(p_in);
    pipe_v.consumer_release(cs.read_v);
    ++cs.read_v;
    if (!Traits::kExpsBeforePVWait || !skip_rescale || __any_sync(0xffffffffu, moved)) {
      scale_rows(tOrO_rc, factor);
    }
    if constexpr (!Traits::kDoubleP) convert_p<Traits>(tSrS_n, p_out);
  };
  // The last P V.
  auto last_pv = [&](auto& p) {
    pipe_v.consumer_wait(cs.read_v);
    Turns::wait(wg);
    warpgroup_fence_operand(p);
    wgmma_gemm<false>(mma_pv, p_as_operand_a<Traits>(p), tOrV(_, _, _, cs.read_v.index()), tOrO);
    Turns::pass(wg);
    warpgroup_wait<0>();
    warpgroup_fence_operand(p);
    pipe_v.consumer_release(cs.read_v);
    ++cs.read_v;
  };
  int n = bi.n_end - 2;
  if constexpr (Traits::kDoubleP) {  // two blocks a trip, so that each P buffer keeps its registers
    for (; n > bi.n_begin; n -= 2) {
      step(n, tOrP0, tOrP1);
      step(n - 1, tOrP1, tOrP0);
    }
    if (n == bi.n_begin) {
      step(n, tOrP0, tOrP1);
      last_pv(tOrP1);
    } else {
      last_pv(tOrP0);
    }
  } else {
    for (; n >= bi.n_begin; --n) step(n, tOrP0, tOrP0);
    last_pv(tOrP0);
  }

  // Epilogue: O / rowsum through shared memory and TMA, or as pairs of fp16/bf16 straight from registers;
  // LSE from the quad leader.
  float inv_sum[kRows], lse[kRows];
  softmax.finalize(inv_sum, lse);
  if constexpr (Traits::kFp8) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) inv_sum[r] *= scales.out;
  }
  scale_rows(tOrO_rc, inv_sum);
  Tensor tOrO_e = make_tensor_like<ElementOut>(tOrO);
  convert_to<ElementOut>(tOrO, tOrO_e);
  Tensor out_rc = make_tensor(tOrO_e.data(), acc_rowcol(tOrO_e.layout()));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(select<0, 1>(TilePV{})));
  Tensor ocoord = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  if (a.has(kFwdTmaStoreO) && (!a.is_varlen() || row0 + Traits::kBlockM <= bi.seqlen_q)) {
    store_o_tma<Traits>(p, ss, tOrO_e, tile, bi, tidx);
  } else {
    ElementOut* out = out_tile_ptr<ElementOut>(a, bi, tile.h, tile.b);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int i = row0 + get<0>(ocoord(r, 0));
      if (i >= bi.seqlen_q) continue;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(out_rc); c += 2) {
        const int col = get<1>(ocoord(r, c));  // even; (c, c + 1) are adjacent columns
        if (col < a.head_dim) {
          cutlass::Array<ElementOut, 2> pair;
          pair[0] = out_rc(r, c);
          pair[1] = out_rc(r, c + 1);
          *reinterpret_cast<cutlass::Array<ElementOut, 2>*>(out + int64_t(i) * a.out_row + col) = pair;
        }
      }
    }
  }
  cs.o_store_pending = a.has(kFwdTmaStoreO);
  float* lse_out = lse_row_ptr(a, bi, tile.h, tile.b);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int i = row0 + get<0>(ocoord(r, 0));
    if (tidx % 4 == 0 && i < bi.seqlen_q) lse_out[i] = lse[r];
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    fwd_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  const auto pp = warp_specialized_params<Pipeline>(warp_group, Traits::kTmaBytesKV, Traits::kConsumerThreads);
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&ss.q_full, 1);
    cutlass::arch::ClusterBarrier::init(&ss.q_empty, Traits::kConsumerThreads);
    cutlass::arch::ClusterBarrier::init(&ss.o_empty, Traits::kConsumerWGs);
    cutlass::arch::ClusterBarrier::init(&ss.tile_full, 1);
    cutlass::arch::ClusterBarrier::init(&ss.tile_empty, Traits::kConsumerThreads + 1);  // + the producer
  }
  Pipeline pipe_k(ss.pipe_k, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipe_v, pp, Shape<_1, _1, _1>{});
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) producer<Traits>(p, ss, pipe_k, pipe_v);
    if (threadIdx.x == 32 && p.args.tile_counter != nullptr) schedule_tiles<Traits>(p.args, ss);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    TurnTaking<Traits::kConsumerWGs>::start((threadIdx.x - 128) / 128);
    ConsumerState<Traits> cs;
    for_each_tile<Traits>(
        p.args, ss,
        [&](const Tile& tile, const BlockInfo& bi) { consume_tile<Traits>(p, ss, pipe_k, pipe_v, cs, tile, bi); },
        [&](const Tile& tile, const BlockInfo& bi) {
          write_empty_tile<Traits>(p.args, bi, tile.h, tile.b, tile.m_block, threadIdx.x - 128,
                                   Traits::kConsumerThreads);
        });
    finish_o_store<Traits>(ss, cs, threadIdx.x - 128);
  }
}

}  // namespace flash_attention::sm90
