// The sm90 backward: three kernels per call.
//
//   bwd_prep_kernel   per query row: dsum = rowsum(dO * O) and lse_log2 = lse * log2(e), into
//                     workspace rows padded to whole query blocks (padding: dsum 0, lse +inf); zeroes
//                     the rows' dq_accum (and the dQ turn counters of deterministic calls).
//   bwd_main_kernel   one CTA per (key block, kv head, batch); warp-specialised:
//     warpgroup 0       producer: one thread loads K, V once (TMA), then for every query head of the
//                       GQA group and every query block that sees these keys: Q + lse_log2 and
//                       dO + dsum into `kStages`-deep shared-memory rings (TMA + bulk copies).
//     warpgroups 1, 2   consumers. Per-warpgroup keys (head dims <= 128, bwd_consumer), 64 keys each;
//                       per query block:
//                         S^T = K Q^T, dP^T = V dO^T        (wgmma SS, issued back to back)
//                         P^T = exp2(S^T * scale_log2 - lse_log2), masked
//                         dV += P^T dO                      (wgmma RS, overlaps the dS arithmetic)
//                         dS^T = P^T * (dP^T - dsum)
//                         dK += dS^T Q                      (wgmma RS, overlaps the dS^T store)
//                         dQ = dS K over all 128 keys       (wgmma SS after both warpgroups stored dS)
//                       dQ (fp32) is staged in shared memory in register order and added to the
//                       workspace with one bulk reduce-add per warpgroup (no per-element atomics).
//                       Shared keys (head dim 256, bwd_consumer_shared_keys): the warpgroups share 64
//                       keys, one computing P^T and the other dS^T, and split D for dV, dK and dQ.
//                       dK, dV stay in registers for the whole CTA and leave once at the end, staged
//                       in the Q / dO rings (DkvStage).
//   bwd_dq_kernel     dQ = softmax_scale * workspace, back to (row, col) order and fp16/bf16.
//
// Padding rows of a query block carry lse = +inf (P = 0) and zero-filled Q / dO (TMA), so only keys
// (ragged tail, causal / window edges) need masking, and only in blocks that straddle an edge.
#pragma once

#include <cuda/atomic>
#include <cuda/ptx>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "cuda/sm90/bwd_traits.h"
#include "cuda/sm90/fwd_kernel.h"  // named barriers, wgmma_gemm, convert_to
#include "cuda/sm90/softmax.h"     // acc_rowcol, acc_as_operand_a

namespace flash_attention::sm90 {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Row kernels: kHeadDim / 8 threads per row, 8 elements (16 bytes) each.
// ---------------------------------------------------------------------------------------------
constexpr int kBwdRowThreads = 256;

template <int kHeadDim>
constexpr int bwd_rows_per_cta() {
  return kBwdRowThreads / (kHeadDim / 8);
}

// Also zeroes the CTA's rows' share of dq_accum (the workspace keeps a (batch, head)'s padded rows
// contiguous: rows x kHeadDim floats), so no memset runs before the main kernel.
template <int kHeadDim, int kBlockM, class Element>
__global__ void __launch_bounds__(kBwdRowThreads) bwd_prep_kernel(const __grid_constant__ BwdArgs a) {
  constexpr int kLanes = kHeadDim / 8;
  const int h = blockIdx.y, b = blockIdx.z;
  const int i = blockIdx.x * bwd_rows_per_cta<kHeadDim>() + threadIdx.x / kLanes;
  const int c = (threadIdx.x % kLanes) * 8;
  if (i < a.m_blocks * kBlockM) {  // the 8 floats (row i, columns c ..) of the row-major view of the slice
    float4* z = reinterpret_cast<float4*>(a.dq_accum + ((int64_t(b) * a.num_heads + h) * a.m_blocks * kBlockM + i) *
                                                           kHeadDim + c);
    z[0] = z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (a.dq_turns != nullptr && i % kBlockM == 0 && c == 0) {
      a.dq_turns[(int64_t(b) * a.num_heads + h) * a.m_blocks + i / kBlockM] = 0;
    }
  }
  float sum = 0.f;
  if (i < a.seqlen_q && c < a.head_dim) {
    const auto* o = static_cast<const Element*>(a.out) + b * a.out_batch + i * a.out_row + h * a.out_head + c;
    const auto* d = static_cast<const Element*>(a.dout) + b * a.dout_batch + i * a.dout_row + h * a.dout_head + c;
    alignas(16) Element ov[8], dv[8];
    *reinterpret_cast<uint4*>(ov) = *reinterpret_cast<const uint4*>(o);
    *reinterpret_cast<uint4*>(dv) = *reinterpret_cast<const uint4*>(d);
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) sum += float(ov[e]) * float(dv[e]);
  }
  CUTE_UNROLL
  for (int lanes = kLanes / 2; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
  const int rows = a.m_blocks * kBlockM;
  if (i < rows && threadIdx.x % kLanes == 0) {
    const int64_t bh = int64_t(b) * a.num_heads + h;
    const bool real = i < a.seqlen_q;
    a.dsum[bh * rows + i] = real ? sum : 0.f;
    a.lse_log2[bh * rows + i] = real ? a.lse[bh * a.seqlen_q + i] * kLog2e : INFINITY;
  }
}

// Offset of the 4 floats (values 4j .. 4j + 3) of consumer thread t's dQ fragment inside one
// dq_accum tile: each warpgroup owns a contiguous half, and its threads' float4s interleave so that
// the shared-memory staging stores are conflict-free.
template <class Traits>
CUTE_HOST_DEVICE constexpr int dq_chunk_offset(int t, int j) {
  return (t / 128) * (Traits::kDqElems / 2) + (j * 128 + t % 128) * 4;
}

// Index of the dQ tile of query block m of (batch b, head h): dq_accum holds kDqElems floats per tile.
CUTE_DEVICE int64_t dq_tile(const BwdArgs& a, int b, int h, int m) {
  return (int64_t(b) * a.num_heads + h) * a.m_blocks + m;
}

// deterministic=True: the key blocks of a (batch, head) add into each dQ tile in key-block order, so
// the fp32 sums, and dQ, are the same on every call. With no left window edge (sm90_api declines one)
// the key blocks that meet query block m are 0 .. n for some n, so block n's adds come after 2n others
// (two warpgroups per CTA, each adding its half of the tile): a warpgroup waits for that count, adds,
// and counts itself once its adds are complete.
CUTE_DEVICE void wait_dq_turn(const BwdArgs& a, int64_t tile) {
  cuda::atomic_ref<int, cuda::thread_scope_device> done(a.dq_turns[tile]);
  const int turn = 2 * int(blockIdx.x);
  while (done.load(cuda::memory_order_acquire) != turn) {
  }
}

CUTE_DEVICE void pass_dq_turn(const BwdArgs& a, int64_t tile) {
  cuda::atomic_ref<int, cuda::thread_scope_device> done(a.dq_turns[tile]);
  done.fetch_add(1, cuda::memory_order_release);
}

// dQ = softmax_scale * workspace tile in fp16/bf16: the tile is read in the main kernel's register order
// (coalesced float4s), converted, and written to shared memory by (row, column), so that the global
// stores are whole 16-byte row pieces (a warp writes two 256-byte rows at head dim 128).
template <class Traits>
__global__ void __launch_bounds__(Traits::kConsumerThreads) bwd_dq_kernel(const __grid_constant__ BwdArgs a) {
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kD = Traits::kHeadDim, kPitch = kD + 8;  // pitch: 16-byte rows, no conflicts
  __shared__ alignas(16) Element tile[kM * kPitch];
  const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z, t = threadIdx.x;
  typename Traits::MmaDQ mma;
  Tensor coord = mma.get_thread_slice(t).partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileDQ{})));
  const float* acc = a.dq_accum + dq_tile(a, b, h, m) * Traits::kDqElems;
  CUTE_UNROLL
  for (int j = 0; j < size(coord) / 4; ++j) {
    const float4 x = *reinterpret_cast<const float4*>(acc + dq_chunk_offset<Traits>(t, j));
    const float vals[4] = {x.x, x.y, x.z, x.w};
    CUTE_UNROLL
    for (int e = 0; e < 4; e += 2) {  // values (v, v + 1) are adjacent columns
      cutlass::Array<Element, 2> pair;
      pair[0] = Element(vals[e] * a.scale);
      pair[1] = Element(vals[e + 1] * a.scale);
      const int row = get<0>(coord(4 * j + e)), col = get<1>(coord(4 * j + e));
      *reinterpret_cast<cutlass::Array<Element, 2>*>(tile + row * kPitch + col) = pair;
    }
  }
  __syncthreads();
  Element* dq = static_cast<Element*>(a.dq) + b * a.dq_batch + h * a.dq_head;
  constexpr int kChunks = kD / 8;  // 16-byte pieces per row
  for (int c = t; c < kM * kChunks; c += Traits::kConsumerThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8, row = m * kM + r;
    if (row < a.seqlen_q && col < a.head_dim) {
      *reinterpret_cast<uint4*>(dq + int64_t(row) * a.dq_row + col) = *reinterpret_cast<const uint4*>(tile + r * kPitch + col);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Main kernel
// ---------------------------------------------------------------------------------------------

// The query blocks a key block meets, and where masking is needed. Query row i may see key j iff
// j < seqlen_k, j <= i + diag + window_right and j >= i + diag - window_left (diag = Sk - Sq).
struct BwdBlock {
  int n0 = 0, m_begin = 0, m_end = 0, diag = 0;

  template <int kBlockM, int kBlockN>
  CUTE_DEVICE static BwdBlock make(const BwdArgs& a, int n_block) {
    BwdBlock blk;
    blk.n0 = n_block * kBlockN;
    blk.diag = a.seqlen_k - a.seqlen_q;
    blk.m_end = a.m_blocks;
    if (a.window_right >= 0) {  // the first row that sees key n0
      blk.m_begin = max(0, blk.n0 - blk.diag - a.window_right) / kBlockM;
    }
    if (a.window_left >= 0) {  // the last row that sees the last key of the block
      const int last_row = min(blk.n0 + kBlockN, a.seqlen_k) - 1 - blk.diag + a.window_left;
      blk.m_end = last_row < 0 ? 0 : min(a.m_blocks, last_row / kBlockM + 1);
    }
    return blk;
  }

  // Does the (query block at m0, this key block) tile hold a pair the mask hides?
  template <int kBlockM, int kBlockN>
  CUTE_DEVICE bool needs_mask(const BwdArgs& a, int m0) const {
    return n0 + kBlockN > a.seqlen_k ||
           (a.window_right >= 0 && n0 + kBlockN - 1 > m0 + diag + a.window_right) ||
           (a.window_left >= 0 && n0 < m0 + kBlockM - 1 + diag - a.window_left);
  }

  CUTE_DEVICE bool visible(const BwdArgs& a, int j, int i) const {
    return j < a.seqlen_k && (a.window_right < 0 || j <= i + diag + a.window_right) &&
           (a.window_left < 0 || j >= i + diag - a.window_left);
  }
};

// P^T = exp2(S^T * scale_log2 - lse_log2[query]) in place (rows: keys, cols: queries); pairs the
// mask hides get 0. `coord` holds (key, query) within the tile.
template <bool kMask, class TS, class TC>
CUTE_DEVICE void scores_to_probs(TS& s, TC const& coord, const float* lse, const BwdArgs& a, const BwdBlock& blk,
                                 int m0) {
  CUTE_UNROLL
  for (int c = 0; c < size<1>(s); ++c) {
    const int qi = get<1>(coord(0, c));
    const float l = lse[qi];
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float p = exp2f(s(r, c) * a.scale_log2 - l);
      if (kMask && !blk.visible(a, blk.n0 + get<0>(coord(r, c)), m0 + qi)) p = 0.f;
      s(r, c) = p;
    }
  }
}

// dP^T becomes dS^T = P^T * (dP^T - dsum[query]) in place (P^T in fp32, or 16 bits read back from smem).
template <class TP, class TD, class TC>
CUTE_DEVICE void probs_to_dscores(TP const& p, TD& dp, TC const& coord, const float* dsum) {
  CUTE_UNROLL
  for (int c = 0; c < size<1>(dp); ++c) {
    const float d = dsum[get<1>(coord(0, c))];
    CUTE_UNROLL
    for (int r = 0; r < size<0>(dp); ++r) dp(r, c) = float(p(r, c)) * (dp(r, c) - d);
  }
}

CUTE_DEVICE void bulk_reduce_add(float* gmem, const float* smem, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gmem),
               "r"(cute::cast_smem_ptr_to_uint(smem)), "r"(bytes)
               : "memory");
}

CUTE_DEVICE void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Named barriers of the consumers (0 is __syncthreads): both warpgroups stored dS; one warpgroup
// staged its dQ.
constexpr int kBarDsStored = 1;
constexpr int kBarDqStaged = 2;  // + warpgroup

template <class Traits>
CUTE_DEVICE void bwd_producer(typename Traits::Params const& p, typename Traits::SharedStorage& ss,
                              typename Traits::Pipeline& pipe_q, typename Traits::Pipeline& pipe_do,
                              const BwdBlock& blk) {
  using T = Traits;
  const BwdArgs& a = p.args;
  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename T::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename T::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename T::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename T::SmemLayoutK{});
  const auto tile_k = Shape<Int<T::kBlockN>, Int<T::kHeadDim>>{};
  const auto tile_q = Shape<Int<T::kBlockM>, Int<T::kHeadDim>>{};

  Tensor gK = local_tile(p.tma_k.get_tma_tensor(p.shape_k)(_, _, hk, b), tile_k, make_coord(n_block, _0{}));
  Tensor gV = local_tile(p.tma_v.get_tma_tensor(p.shape_k)(_, _, hk, b), tile_k, make_coord(n_block, _0{}));
  auto tk = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto tv = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.kv_full, T::kTmaBytesKV);
  copy(p.tma_k.with(ss.kv_full, 0), get<0>(tk), get<1>(tk));
  copy(p.tma_v.with(ss.kv_full, 0), get<0>(tv), get<1>(tv));

  auto state_q = cutlass::make_producer_start_state<typename T::Pipeline>();
  auto state_do = state_q;
  const int rows = a.m_blocks * T::kBlockM;
  for (int g = 0; g < a.heads_per_kv_head; ++g) {
    const int h = hk * a.heads_per_kv_head + g;
    Tensor gQ = local_tile(p.tma_q.get_tma_tensor(p.shape_q)(_, _, h, b), tile_q, make_coord(_, _0{}));
    Tensor gdO = local_tile(p.tma_do.get_tma_tensor(p.shape_q)(_, _, h, b), tile_q, make_coord(_, _0{}));
    auto tq = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto tdo = tma_partition(p.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
    const int64_t row0 = (int64_t(b) * a.num_heads + h) * rows;
    for (int m = blk.m_begin; m < blk.m_end; ++m) {
      pipe_q.producer_acquire(state_q);
      uint64_t* bar = pipe_q.producer_get_barrier(state_q);
      copy(p.tma_q.with(*bar, 0), get<0>(tq)(_, m), get<1>(tq)(_, state_q.index()));
      SM90_BULK_COPY_G2S::copy(a.lse_log2 + row0 + m * T::kBlockM, bar,
                               ss.lse.data() + state_q.index() * T::kBlockM, T::kBlockM * sizeof(float));
      ++state_q;
      pipe_do.producer_acquire(state_do);
      bar = pipe_do.producer_get_barrier(state_do);
      copy(p.tma_do.with(*bar, 0), get<0>(tdo)(_, m), get<1>(tdo)(_, state_do.index()));
      SM90_BULK_COPY_G2S::copy(a.dsum + row0 + m * T::kBlockM, bar,
                               ss.dsum.data() + state_do.index() * T::kBlockM, T::kBlockM * sizeof(float));
      ++state_do;
    }
  }
}

// dK / dV epilogue: the accumulators (scaled, fp16/bf16) are staged in the Q / dO rings, free once every
// query block is done, then written as whole 16-byte row pieces (bounds-checked rows and columns). The
// staged tile is (kBlockN, D) with its 16-byte chunks XOR-swizzled by row, so that the pair stores of the
// accumulator layout (8 rows x 4 lanes per instruction) hit 32 different banks.
template <class Traits>
struct DkvStage {
  static constexpr int kN = Traits::kBlockN, kD = Traits::kHeadDim, kChunks = kD / 8;
  static_assert(kN * kD <= Traits::kBlockM * kD * Traits::kStages, "a dK / dV tile must fit in one Q / dO ring");

  static CUTE_DEVICE int offset(int row, int col) { return row * kD + ((col / 8) ^ (row % 8)) * 8 + col % 8; }

  template <class Acc, class ThrMma, class Element>
  static CUTE_DEVICE void stage(Acc const& acc, ThrMma const& thr, float scale, Element* tile) {
    Tensor acc_rc = make_tensor(acc.data(), acc_rowcol(acc.layout()));
    Tensor tc = thr.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileDKV{})));
    Tensor coord = make_tensor(tc.data(), acc_rowcol(tc.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(acc_rc); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_rc); c += 2) {  // (c, c + 1) are adjacent columns
        cutlass::Array<Element, 2> pair;
        pair[0] = Element(acc_rc(r, c) * scale);
        pair[1] = Element(acc_rc(r, c + 1) * scale);
        *reinterpret_cast<cutlass::Array<Element, 2>*>(tile + offset(get<0>(coord(r, c)), get<1>(coord(r, c)))) = pair;
      }
    }
  }

  template <class Element>
  static CUTE_DEVICE void store(const Element* tile, Element* base, int64_t row_stride, const BwdArgs& a, int n0,
                                int thread) {
    for (int c = thread; c < kN * kChunks; c += Traits::kConsumerThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      if (n0 + r < a.seqlen_k && col < a.head_dim) {
        *reinterpret_cast<uint4*>(base + int64_t(n0 + r) * row_stride + col) =
            *reinterpret_cast<const uint4*>(tile + offset(r, col));
      }
    }
  }
};

constexpr int kBarEpilogue = 5;  // named barrier of the consumers (ids 1-4: the consumer loops')

// Both consumer warpgroups: dV (unscaled) and dK (scaled) of this CTA's keys to global memory.
template <class Traits, class Acc, class ThrMma>
CUTE_DEVICE void store_dkv(Acc const& dv_acc, Acc const& dk_acc, ThrMma const& thr, typename Traits::SharedStorage& ss,
                           const BwdArgs& a, int n0) {
  using Element = typename Traits::Element;
  using Stage = DkvStage<Traits>;
  const int b = blockIdx.z, hk = blockIdx.y, tidx = threadIdx.x - 128;
  named_bar_sync(kBarEpilogue, Traits::kConsumerThreads);  // every GEMM has read its last Q / dO
  Stage::stage(dv_acc, thr, 1.f, ss.q.data());
  Stage::stage(dk_acc, thr, a.scale, ss.dout.data());
  named_bar_sync(kBarEpilogue, Traits::kConsumerThreads);
  Stage::store(ss.q.data(), static_cast<Element*>(a.dv) + b * a.dv_batch + hk * a.dv_head, a.dv_row, a, n0, tidx);
  Stage::store(ss.dout.data(), static_cast<Element*>(a.dk) + b * a.dk_batch + hk * a.dk_head, a.dk_row, a, n0, tidx);
}

// The consumers' views of the shared-memory tiles: each buffer as the operand shapes the GEMMs take.
template <class T>
struct BwdSmem {
  template <class Layout, class Elem = typename T::Element>
  using View = decltype(make_tensor(make_smem_ptr(static_cast<Elem*>(nullptr)), Layout{}));
  template <class Layout, class Elem>
  static CUTE_DEVICE auto view(Elem* ptr) {
    return make_tensor(make_smem_ptr(ptr), Layout{});
  }

  View<typename T::SmemLayoutQ> q, dout;         // (M, D, stages)
  View<typename T::SmemLayoutQt> q_t, dout_t;    // (D, M, stages)
  View<typename T::SmemLayoutK> k, v;            // (N, D)
  View<typename T::SmemLayoutKt> k_t;            // (D, N)
  View<typename T::SmemLayoutDS> ds;             // (M, N, 2)
  View<typename T::SmemLayoutDSt> ds_t;          // (N, M, 2)

  CUTE_DEVICE explicit BwdSmem(typename T::SharedStorage& ss)
      : q(view<typename T::SmemLayoutQ>(ss.q.data())),
        dout(view<typename T::SmemLayoutQ>(ss.dout.data())),
        q_t(view<typename T::SmemLayoutQt>(ss.q.data())),
        dout_t(view<typename T::SmemLayoutQt>(ss.dout.data())),
        k(view<typename T::SmemLayoutK>(ss.k.data())),
        v(view<typename T::SmemLayoutK>(ss.v.data())),
        k_t(view<typename T::SmemLayoutKt>(ss.k.data())),
        ds(view<typename T::SmemLayoutDS>(ss.ds.data())),
        ds_t(view<typename T::SmemLayoutDSt>(ss.ds.data())) {}
};

template <class Traits>
CUTE_DEVICE void bwd_consumer(typename Traits::Params const& p, typename Traits::SharedStorage& ss,
                              typename Traits::Pipeline& pipe_q, typename Traits::Pipeline& pipe_do,
                              const BwdBlock& blk) {
  using T = Traits;
  using Element = typename T::Element;
  const BwdArgs& a = p.args;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int tidx = threadIdx.x - 128;
  const int wg = tidx / 128;
  const bool wg_leader = tidx % 128 == 0;

  const BwdSmem<T> sm(ss);
  auto& sQ = sm.q; auto& sQt = sm.q_t; auto& sdO = sm.dout; auto& sdOt = sm.dout_t;
  auto& sK = sm.k; auto& sKt = sm.k_t; auto& sV = sm.v;
  auto& sdS = sm.ds; auto& sdSt = sm.ds_t;

  typename T::MmaSdP mma_sdp;
  typename T::MmaDKV mma_dkv;
  typename T::MmaDQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tidx);
  auto thr_dkv = mma_dkv.get_thread_slice(tidx);
  auto thr_dq = mma_dq.get_thread_slice(tidx);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);      // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);      // (MMA, MMA_N, MMA_K, stages)
  Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
  Tensor tdVrdO = thr_dkv.partition_fragment_B(sdOt);  // (MMA, MMA_N = D, MMA_K = queries, stages)
  Tensor tdKrQ = thr_dkv.partition_fragment_B(sQt);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);    // (MMA, MMA_M, MMA_K, 2)
  Tensor tdQrK = thr_dq.partition_fragment_B(sKt);     // (MMA, MMA_N, MMA_K)
  Tensor tdSsdS = thr_sdp.partition_C(sdSt);           // where this thread's dS^T goes, per buffer
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(select<0, 1>(typename T::TileSdP{})));
  Tensor coord = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));  // (key, query)

  Tensor tdVrdV = partition_fragment_C(mma_dkv, select<0, 1>(typename T::TileDKV{}));
  Tensor tdKrdK = partition_fragment_C(mma_dkv, select<0, 1>(typename T::TileDKV{}));
  clear(tdVrdV);
  clear(tdKrdK);

  typename T::PipelineState read_q, read_do;
  int buf = 0;
  float* dq_stage = ss.dq.data() + wg * (T::kDqElems / 2);

  // One query block m of head h against this CTA's keys.
  auto step = [&](int h, int m) {
    const int m0 = m * T::kBlockM;
    Tensor tSrS = partition_fragment_C(mma_sdp, select<0, 1>(typename T::TileSdP{}));
    Tensor tSrdP = partition_fragment_C(mma_sdp, select<0, 1>(typename T::TileSdP{}));
    pipe_q.consumer_wait(read_q);
    wgmma_gemm<true>(mma_sdp, tSrK, tSrQ(_, _, _, read_q.index()), tSrS);
    pipe_do.consumer_wait(read_do);
    wgmma_gemm<true>(mma_sdp, tSrV, tSrdO(_, _, _, read_do.index()), tSrdP);

    warpgroup_wait<1>();
    Tensor s_rc = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    const float* lse = ss.lse.data() + read_q.index() * T::kBlockM;
    if (blk.needs_mask<T::kBlockM, T::kBlockN>(a, m0)) {
      scores_to_probs<true>(s_rc, coord, lse, a, blk, m0);
    } else {
      scores_to_probs<false>(s_rc, coord, lse, a, blk, m0);
    }
    Tensor tPrP = make_tensor_like<Element>(tSrS);
    convert_to<Element>(tSrS, tPrP);
    Tensor tPrP_a = make_tensor(tPrP.data(), acc_as_operand_a(tPrP.layout()));
    warpgroup_wait<0>();
    warpgroup_fence_operand(tPrP);
    wgmma_gemm<false>(mma_dkv, tPrP_a, tdVrdO(_, _, _, read_do.index()), tdVrdV);

    Tensor dp_rc = make_tensor(tSrdP.data(), acc_rowcol(tSrdP.layout()));
    probs_to_dscores(s_rc, dp_rc, coord, ss.dsum.data() + read_do.index() * T::kBlockM);
    Tensor tdSrdS = make_tensor_like<Element>(tSrdP);
    convert_to<Element>(tSrdP, tdSrdS);
    Tensor tdSrdS_a = make_tensor(tdSrdS.data(), acc_as_operand_a(tdSrdS.layout()));
    warpgroup_fence_operand(tdSrdS);
    wgmma_gemm<false>(mma_dkv, tdSrdS_a, tdKrQ(_, _, _, read_q.index()), tdKrdK);
    copy(tdSrdS, tdSsdS(_, _, _, buf));
    cutlass::arch::fence_view_async_shared();
    if (wg_leader) cute::tma_store_wait<0>();  // the previous dQ reduce-add has read dq_stage
    named_bar_sync(kBarDsStored, T::kConsumerThreads);

    Tensor tdQrdQ = partition_fragment_C(mma_dq, select<0, 1>(typename T::TileDQ{}));
    wgmma_gemm<true>(mma_dq, tdQrdS(_, _, _, buf), tdQrK, tdQrdQ);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tPrP);
    warpgroup_fence_operand(tdSrdS);
    pipe_q.consumer_release(read_q);
    ++read_q;
    pipe_do.consumer_release(read_do);
    ++read_do;
    buf ^= 1;

    CUTE_UNROLL
    for (int j = 0; j < size(tdQrdQ) / 4; ++j) {
      *reinterpret_cast<float4*>(dq_stage + (j * 128 + tidx % 128) * 4) =
          make_float4(tdQrdQ(4 * j), tdQrdQ(4 * j + 1), tdQrdQ(4 * j + 2), tdQrdQ(4 * j + 3));
    }
    cutlass::arch::fence_view_async_shared();
    named_bar_sync(kBarDqStaged + wg, 128);
    if (wg_leader) {
      const int64_t tile = dq_tile(a, b, h, m);
      if (a.dq_turns != nullptr) wait_dq_turn(a, tile);
      bulk_reduce_add(a.dq_accum + tile * T::kDqElems + wg * (T::kDqElems / 2), dq_stage,
                      T::kDqElems / 2 * sizeof(float));
      cute::tma_store_arrive();
      if (a.dq_turns != nullptr) {  // the reduce-add complete and visible before the count
        bulk_wait_all();
        cuda::ptx::fence_proxy_async(cuda::ptx::space_global);
        pass_dq_turn(a, tile);
      }
    }
  };

  if (blk.m_begin < blk.m_end) {
    cutlass::arch::ClusterTransactionBarrier::wait(&ss.kv_full, 0);
    for (int g = 0; g < a.heads_per_kv_head; ++g) {
      for (int m = blk.m_begin; m < blk.m_end; ++m) step(hk * a.heads_per_kv_head + g, m);
    }
  }
  if (wg_leader) bulk_wait_all();

  store_dkv<T>(tdVrdV, tdKrdK, thr_dkv, ss, a, blk.n0);
}

// Adds one warpgroup's dQ fragment to the fp32 workspace from registers (16-byte vector atomics, in
// the order dq_chunk_offset gives: a warp's 32 lanes cover 512 contiguous bytes per instruction).
template <class Traits, class Acc>
CUTE_DEVICE void atomic_add_dq(float* tile, Acc const& dq, int tidx) {
  CUTE_UNROLL
  for (int j = 0; j < size(dq) / 4; ++j) {
    atomicAdd(reinterpret_cast<float4*>(tile + dq_chunk_offset<Traits>(tidx, j)),
              make_float4(dq(4 * j), dq(4 * j + 1), dq(4 * j + 2), dq(4 * j + 3)));
  }
}

// Named barriers of the shared-keys consumers: P^T stored (warpgroup 0 arrives, 1 waits), dS^T stored
// (1 arrives, 0 waits), and each warpgroup's own stores before its wgmmas read them.
constexpr int kBarPStored = 1;
constexpr int kBarDsWritten = 2;
constexpr int kBarOwnStores = 3;  // + warpgroup

// Consumer of the shared-keys tiles (kBlockN = 64, head dim 256): see bwd_traits.h. Per query block:
//   warpgroup 0: S^T = K Q^T, P^T = exp2(...) -> smem    warpgroup 1: dP^T = V dO^T
//                                                           waits for P^T; dS^T = P^T (dP^T - dsum) -> smem
//   each, on its D / 2 columns: dV += P^T dO; once dS^T is stored, dK += dS^T Q and dQ = dS K.
// P^T and dS^T are double-buffered: a warpgroup rewrites a buffer only after passing the other's signal
// of the next step, which the other gives after it has waited for its GEMMs of this step.
// kScores: warpgroup 0 (P^T); else warpgroup 1 (dS^T). Each role is its own straight-line loop.
template <class Traits, bool kScores>
CUTE_DEVICE void bwd_consumer_shared_keys(typename Traits::Params const& p, typename Traits::SharedStorage& ss,
                                          typename Traits::Pipeline& pipe_q, typename Traits::Pipeline& pipe_do,
                                          const BwdBlock& blk) {
  using T = Traits;
  using Element = typename T::Element;
  const BwdArgs& a = p.args;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int tidx = threadIdx.x - 128;
  constexpr int wg = kScores ? 0 : 1;

  const BwdSmem<T> sm(ss);
  auto& sQ = sm.q; auto& sQt = sm.q_t; auto& sdO = sm.dout; auto& sdOt = sm.dout_t;
  auto& sK = sm.k; auto& sKt = sm.k_t; auto& sV = sm.v;
  auto& sdS = sm.ds;
  Tensor sPt = make_tensor(make_smem_ptr(ss.p.data()), typename T::SmemLayoutPt{});   // K-major A operands
  Tensor sdSt = make_tensor(make_smem_ptr(ss.ds.data()), typename T::SmemLayoutPt{});

  typename T::MmaSdP mma_sdp;  // one warpgroup, the whole (keys x queries) tile
  typename T::MmaDKV mma_dkv;  // warpgroups split D
  typename T::MmaDQ mma_dq;    // warpgroups split D
  auto thr_sdp = mma_sdp.get_thread_slice(tidx % 128);
  auto thr_dkv = mma_dkv.get_thread_slice(tidx);
  auto thr_dq = mma_dq.get_thread_slice(tidx);
  Tensor tSrA = thr_sdp.partition_fragment_A(kScores ? sK : sV);    // (MMA, MMA_M, MMA_K)
  Tensor tSrB = thr_sdp.partition_fragment_B(kScores ? sQ : sdO);   // (MMA, MMA_N, MMA_K, stages)
  Tensor tSsP = thr_sdp.partition_C(sPt);                          // this thread's P^T / dS^T, per buffer
  Tensor tSsdS = thr_sdp.partition_C(sdSt);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(select<0, 1>(typename T::TileSdP{})));
  Tensor coord = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));  // (key, query)
  Tensor tdVrP = thr_dkv.partition_fragment_A(sPt);     // (MMA, MMA_M, MMA_K, 2)
  Tensor tdKrdS = thr_dkv.partition_fragment_A(sdSt);
  Tensor tdVrdO = thr_dkv.partition_fragment_B(sdOt);   // (MMA, MMA_N = D / 2, MMA_K = queries, stages)
  Tensor tdKrQ = thr_dkv.partition_fragment_B(sQt);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);     // (MMA, MMA_M, MMA_K, 2)
  Tensor tdQrK = thr_dq.partition_fragment_B(sKt);

  Tensor tdVrdV = partition_fragment_C(mma_dkv, select<0, 1>(typename T::TileDKV{}));
  Tensor tdKrdK = partition_fragment_C(mma_dkv, select<0, 1>(typename T::TileDKV{}));
  clear(tdVrdV);
  clear(tdKrdK);

  typename T::PipelineState read_q, read_do;  // the two rings advance together: same stage index
  int buf = 0;

  auto step = [&](int h, int m) {
    const int m0 = m * T::kBlockM, stage = read_q.index();
    Tensor acc = partition_fragment_C(mma_sdp, select<0, 1>(typename T::TileSdP{}));  // S^T or dP^T
    Tensor acc_rc = make_tensor(acc.data(), acc_rowcol(acc.layout()));
    Tensor frag = make_tensor_like<Element>(acc);  // P^T or dS^T in 16 bits
    if constexpr (kScores) {
      pipe_q.consumer_wait(read_q);
      wgmma_gemm<true>(mma_sdp, tSrA, tSrB(_, _, _, stage), acc);
      warpgroup_wait<0>();
      const float* lse = ss.lse.data() + stage * T::kBlockM;
      if (blk.needs_mask<T::kBlockM, T::kBlockN>(a, m0)) {
        scores_to_probs<true>(acc_rc, coord, lse, a, blk, m0);
      } else {
        scores_to_probs<false>(acc_rc, coord, lse, a, blk, m0);
      }
      convert_to<Element>(acc, frag);
      copy(frag, tSsP(_, _, _, buf));
      cutlass::arch::fence_view_async_shared();
      named_bar_arrive(kBarPStored, T::kConsumerThreads);
      named_bar_sync(kBarOwnStores + wg, 128);
      pipe_do.consumer_wait(read_do);
      wgmma_gemm<false>(mma_dkv, tdVrP(_, _, _, buf), tdVrdO(_, _, _, stage), tdVrdV);
      named_bar_sync(kBarDsWritten, T::kConsumerThreads);
    } else {
      pipe_do.consumer_wait(read_do);
      wgmma_gemm<true>(mma_sdp, tSrA, tSrB(_, _, _, stage), acc);
      warpgroup_wait<0>();
      named_bar_sync(kBarPStored, T::kConsumerThreads);
      wgmma_gemm<false>(mma_dkv, tdVrP(_, _, _, buf), tdVrdO(_, _, _, stage), tdVrdV);
      copy(tSsP(_, _, _, buf), frag);
      probs_to_dscores(make_tensor(frag.data(), acc_rowcol(frag.layout())), acc_rc, coord,
                       ss.dsum.data() + stage * T::kBlockM);
      convert_to<Element>(acc, frag);
      copy(frag, tSsdS(_, _, _, buf));
      cutlass::arch::fence_view_async_shared();
      named_bar_arrive(kBarDsWritten, T::kConsumerThreads);
      named_bar_sync(kBarOwnStores + wg, 128);
      pipe_q.consumer_wait(read_q);
    }
    wgmma_gemm<false>(mma_dkv, tdKrdS(_, _, _, buf), tdKrQ(_, _, _, stage), tdKrdK);
    Tensor tdQrdQ = partition_fragment_C(mma_dq, select<0, 1>(typename T::TileDQ{}));
    wgmma_gemm<true>(mma_dq, tdQrdS(_, _, _, buf), tdQrK, tdQrdQ);
    warpgroup_wait<0>();
    pipe_q.consumer_release(read_q);
    ++read_q;
    pipe_do.consumer_release(read_do);
    ++read_do;
    buf ^= 1;
    const int64_t tile = dq_tile(a, b, h, m);
    if (a.dq_turns != nullptr) {
      if (tidx % 128 == 0) wait_dq_turn(a, tile);
      named_bar_sync(kBarOwnStores + wg, 128);
    }
    atomic_add_dq<T>(a.dq_accum + tile * T::kDqElems, tdQrdQ, tidx);
    if (a.dq_turns != nullptr) {  // every thread's adds performed before the count
      __threadfence();
      named_bar_sync(kBarOwnStores + wg, 128);
      if (tidx % 128 == 0) pass_dq_turn(a, tile);
    }
  };

  if (blk.m_begin < blk.m_end) {
    cutlass::arch::ClusterTransactionBarrier::wait(&ss.kv_full, 0);
    for (int g = 0; g < a.heads_per_kv_head; ++g) {
      for (int m = blk.m_begin; m < blk.m_end; ++m) step(hk * a.heads_per_kv_head + g, m);
    }
  }
  store_dkv<T>(tdVrdV, tdKrdK, thr_dkv, ss, a, blk.n0);
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) bwd_main_kernel(CUTE_GRID_CONSTANT typename Traits::Params const p) {
  using Pipeline = typename Traits::Pipeline;
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int warp_group = cutlass::canonical_warp_group_idx();
  const auto pp = warp_specialized_params<Pipeline>(warp_group, Traits::kStageBytes, Traits::kConsumerThreads);
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&ss.kv_full, 1);
  Pipeline pipe_q(ss.pipe_q, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_do(ss.pipe_do, pp, Shape<_1, _1, _1>{});
  __syncthreads();

  const BwdBlock blk = BwdBlock::make<Traits::kBlockM, Traits::kBlockN>(p.args, blockIdx.x);
  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0 && blk.m_begin < blk.m_end) bwd_producer<Traits>(p, ss, pipe_q, pipe_do, blk);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    if constexpr (Traits::kSharedKeys) {
      if (warp_group == 1) {
        bwd_consumer_shared_keys<Traits, true>(p, ss, pipe_q, pipe_do, blk);
      } else {
        bwd_consumer_shared_keys<Traits, false>(p, ss, pipe_q, pipe_do, blk);
      }
    } else {
      bwd_consumer<Traits>(p, ss, pipe_q, pipe_do, blk);
    }
  }
}

}  // namespace flash_attention::sm90
