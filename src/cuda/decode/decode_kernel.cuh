// Split-KV attention over a (paged) KV cache on the tensor cores (mma.sync m16n8k16, CuTe atoms).
//
// One CTA (kWarps = 4 warps; on sm90 also 8, the wide CTA, or 3, the narrow one) = (16 packed query rows of
// one KV head, split, batch); see decode_args.h. The CTA's key range is cut into blocks of 16 keys; warp w
// takes blocks w, w + kWarps, ... and runs on its own (no CTA barrier per block): a private 2-stage cp.async
// pipeline of 16-byte loads (K and V rows of its block), S = Q K^T and O += P V with mma.sync, and an online
// softmax on the accumulator fragments. At the end the warps merge their (max, sum, O) through shared memory
// in a fixed order; the CTA writes the output + lse (one split), or its split is merged with the others:
// through distributed shared memory when the splits form one cluster (sm90, at most 8 splits: merge_cluster),
// else through fp32 partials that the last CTA of the splits to arrive merges (merge_splits). The Q tile's
// loads go out before the cache lengths' (QTile), so that Q has landed in shared memory, not just been
// requested, by the time the first K / V block arrives.
//
// Measured on H200 (benchmarks/results/h200_decode_diag.csv): a warp needed about 1.75 us per block of 16
// keys whatever else ran on its SM, which matched the SM's issue rate at ~900 instructions per block with
// 3 CTAs x 4 warps per SM. 3 stages left two CTAs per SM (107 KB of shared memory each) and topped out
// near 3.9 TB/s; 2 stages (70 KB) fit three. A head-major cache and an L2 prefetch hint changed nothing.
//
// Session 3 first cut the main loop's common path from ~850 SASS instructions to 222 by giving each lane one
// key row, and lost ~25 % of bandwidth wherever memory mattered (H200: B=64 Sk=128k 99.5 -> 73.3 % of copy
// bandwidth): one warp instruction touched 16 rows x 32 bytes, 16 separate L2 / DRAM requests. The access
// pattern of each warp instruction matters as much as the instruction count. The loop now:
// - Copies: per instruction, consecutive lanes take consecutive 16-byte chunks of one key row, so one
//   instruction reads whole rows (hdim 128: 2 rows of 256 bytes, as the old kernel; hdim 64: 4 x 128;
//   256: 1 x 512; 96 / 192 in two power-of-two segments). A lane's copies are rows r0 + (32 / n) c of one
//   chunk: shared offsets fold into the instructions; global ones cost one 64-bit add each (the row stride
//   is a runtime value). Lane offsets are fixed for the loop (LaneCopies); the block's row pointer advances
//   by a constant (contiguous) or follows the page table without a division (RowCursor, one page lookup
//   per block ahead; a block spans two pages only when the left padding is not a multiple of 16).
// - Scores: scale only, unless softcap / ALiBi / a window is on or the block runs past the sequence end
//   (mask_scores; one uniform branch per block). Fully masked rows need no per-element select (the max
//   used for the exponent is 0 while a row has seen nothing).
// - The O rescale (64 multiplies) is skipped when no row of the warp saw its max grow (a warp vote).
// Common path now (sm_90a, hdim 128, bf16; +64 when a row max grows): 271 instructions contiguous (128
// registers), 328 paged (162 registers; three 70 KB CTAs per SM still fit). H200, same split counts as
// before: 76-103 % of copy bandwidth at B*Sk >= 64k (was 60-100 %), 0.63-0.96x cuDNN (was 0.58-0.92x).
//
// Session 4 (H200, benchmarks/NOTES.md): with few CTAs (small batch) a warp's time per block is the latency of
// its dependent chain, not memory: 4 pipeline stages at one CTA per SM changed nothing (so there are 2),
// while Q held in registers and two accumulator chains for S made B = 64 2-8 % faster (two runs). A CTA over one
// block of 16 keys takes 4.4 us (launch, sequence lengths, Q / K / V loads, merge, store).
//
// Session 7 (sm90, DecodeArgs::tma): K / V blocks by 2-D TMA instead of 16-byte cp.async rows ("TMA tiles"
// below; the host picks it from 4 key blocks per warp, kvcache.cu choose_tma): one tensor copy per K / V block
// from lane 0, 128-byte swizzled stages. H200: 3-6 % faster wherever a warp has 4+ blocks (B = 64 128k at
// 110 % of copy bandwidth, as cuDNN), 1.4 % slower with 2 (benchmarks/NOTES.md, session 7).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4): A (16x16) rows g / g+8, columns
// 2t, 2t+1 (+8); B (16x8) rows 2t, 2t+1 (+8), column g; C (16x8) rows g / g+8, columns 2t, 2t+1.
#pragma once

#include <cuda.h>  // CUtensorMap and the encoder's types (the encoder itself comes from the runtime's entry point)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

#include <cooperative_groups.h>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "cuda/decode/decode_args.h"

namespace flash_attention::cuda::decode {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ----------------------------------------------------------------------------------------------------
// Sequence geometry and key addresses
// ----------------------------------------------------------------------------------------------------

// One sequence as this kernel sees it (indices clamped so that nothing is ever read out of bounds).
struct SeqView {
  int sk = 0;        // effective keys
  int leftpad = 0;
  int sq = 0;        // query rows
  int64_t q_start = 0;
  int cache_row = 0; // contiguous caches
};

// What one CTA computes: rows [row0, row0 + rows) of KV head hk of sequence b, over key blocks
// [k_begin, k_end) (blocks of kDecodeBlock keys).
struct CtaWork {
  SeqView s;
  int b = 0, split = 0, group = 1, row0 = 0, rows = 0, hk = 0, offset = 0;
  int k_begin = 0, k_end = 0;
};

// The CTA's rows: row tile blockIdx.x / Hk of KV head blockIdx.x % Hk of sequence blockIdx.z. Loads nothing
// unless the batch is varlen (cu_seqlens_q), so that the Q tile's loads can go first (QTile).
__device__ __forceinline__ CtaWork cta_rows(const DecodeArgs& a) {
  CtaWork w;
  w.b = blockIdx.z;
  w.split = blockIdx.y;
  w.group = a.heads / a.heads_k;
  w.hk = blockIdx.x % a.heads_k;
  w.row0 = (blockIdx.x / a.heads_k) * kDecodeRows;
  w.s.q_start = a.cu_seqlens_q ? a.cu_seqlens_q[w.b] : 0;
  w.s.sq = a.cu_seqlens_q ? a.cu_seqlens_q[w.b + 1] - a.cu_seqlens_q[w.b] : a.seqlen_q;
  w.rows = min(kDecodeRows, w.s.sq * w.group - w.row0);
  return w;
}

// The CTA's keys, from the cache lengths of its sequence: the visible keys of the tile's rows, cut into
// num_splits runs of whole rounds of the kWarps warps.
template <int kWarps>
__device__ __forceinline__ void cta_keys(const DecodeArgs& a, CtaWork& w) {
  const int sk_cache = a.cache_seqlens ? min(max(a.cache_seqlens[w.b], 0), a.capacity - a.seqlen_new) : a.capacity;
  w.s.leftpad = a.cache_leftpad ? min(max(a.cache_leftpad[w.b], 0), sk_cache) : 0;
  w.s.sk = sk_cache + a.seqlen_new - w.s.leftpad;
  w.s.cache_row = a.cache_batch_idx ? a.cache_batch_idx[w.b] : w.b;
  w.offset = w.s.sk - w.s.sq;
  const int i_first = w.row0 / w.group, i_last = (w.row0 + max(w.rows, 1) - 1) / w.group;
  const int n_lo = a.window_left >= 0 ? max(0, i_first + w.offset - a.window_left) : 0;
  const int n_hi = a.window_right >= 0 ? min(w.s.sk, i_last + w.offset + a.window_right + 1) : w.s.sk;
  const int k_lo = n_lo / kDecodeBlock;
  const int k_hi = n_hi > n_lo ? (n_hi + kDecodeBlock - 1) / kDecodeBlock : k_lo;
  int per_split = (k_hi - k_lo + a.num_splits - 1) / a.num_splits;
  per_split = (per_split + kWarps - 1) / kWarps * kWarps;
  w.k_begin = min(k_hi, k_lo + w.split * per_split);
  w.k_end = min(k_hi, w.k_begin + per_split);
}

// Query index, head and packed global row (dense b * Sq + i, varlen q_start + i) of tile row r.
struct RowRef {
  int i = 0, h = 0;
  int64_t row_g = 0;
};

__device__ __forceinline__ RowRef row_ref(const DecodeArgs& a, const CtaWork& w, int r) {
  RowRef ref;
  ref.i = (w.row0 + r) / w.group;
  ref.h = w.hk * w.group + (w.row0 + r) % w.group;
  ref.row_g = a.cu_seqlens_q ? w.s.q_start + ref.i : int64_t(w.b) * a.seqlen_q + ref.i;
  return ref;
}

// Element offset of the row's output (head included), and its index in softmax_lse.
__device__ __forceinline__ int64_t out_offset(const DecodeArgs& a, const CtaWork& w, const RowRef& ref) {
  return (a.cu_seqlens_q ? ref.row_g * a.out_row : w.b * a.out_batch + ref.i * a.out_row) + ref.h * a.out_head;
}
__device__ __forceinline__ int64_t lse_index(const DecodeArgs& a, const CtaWork& w, const RowRef& ref) {
  return a.cu_seqlens_q ? int64_t(ref.h) * a.total_rows + ref.row_g
                        : (int64_t(w.b) * a.heads + ref.h) * a.seqlen_q + ref.i;
}

// ----------------------------------------------------------------------------------------------------
// Shared memory plan and small device helpers
// ----------------------------------------------------------------------------------------------------

constexpr int cmax(int x, int y) { return x > y ? x : y; }

template <int kHeadDim, int kWarps_ = kDecodeWarps>
struct Traits {
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = kDecodeRows;
  static constexpr int kBlock = kDecodeBlock;
  static constexpr int kWarpStride = kWarps * kBlock;  // keys between a warp's consecutive blocks
  // Per warp. Two stages keep 16-byte loads far beyond what HBM latency needs in flight, and at hdim 128
  // (70 KB per CTA) let three CTAs reside per SM instead of two: a warp's speed is bound by its own
  // instruction latencies, so throughput follows the number of resident warps. (Measured, session 4:
  // 4 stages at one CTA per SM changed no small-batch time by more than 2 %.)
  static constexpr int kStages = 2;
  static constexpr int kChunks = kHeadDim / 8;              // 16-byte chunks per row
  static constexpr int kRowElems = kHeadDim + 8;            // +16 bytes: ldmatrix rows hit distinct banks
  static constexpr int kStageElems = 2 * kBlock * kRowElems;  // K then V
  static constexpr int kKVBytes = kWarps * kStages * kStageElems * 2;
  static constexpr int kMergeBytes = kWarps * kRows * kHeadDim * 4;           // warps' O, after the loop
  static constexpr int kScratchBytes = cmax(kKVBytes, kMergeBytes);
  // Statistics: per warp (max, sum) of its 16 rows, the merged (max, sum), the last-arrival flag.
  static constexpr int kStatFloats = 2 * kWarps * kRows + 2 * kRows + 4;
  static constexpr int kQBytes = kRows * kRowElems * 2;
  static constexpr int kSmemBytes = kStatFloats * 4 + kScratchBytes + kQBytes;
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kScratchBytes % 16 == 0 && (kStatFloats * 4) % 16 == 0, "16-byte aligned regions");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm90 SM has");
};

template <typename Element> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> { using type = cute::SM80_16x8x16_F32BF16BF16F32_TN; };
template <> struct MmaOp<__half> { using type = cute::SM80_16x8x16_F32F16F16F32_TN; };

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// ldmatrix x4 (and .trans, CuTe's) from a pointer into shared memory, or from a shared-window address (the
// TMA tiles swizzle addresses: "TMA tiles" below).
template <typename T>
__device__ __forceinline__ void ldsm_x4(const T* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}
template <typename T>
__device__ __forceinline__ void ldsm_x4_trans(const T* smem, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ const void* smem_ptr(unsigned addr) { return __cvta_shared_to_generic(addr); }
__device__ __forceinline__ void ldsm_x4_at(unsigned addr, uint32_t (&r)[4]) { ldsm_x4(smem_ptr(addr), r); }
__device__ __forceinline__ void ldsm_x4_trans_at(unsigned addr, uint32_t (&r)[4]) { ldsm_x4_trans(smem_ptr(addr), r); }

template <typename Element>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOp<Element>::type::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

// 16-byte global -> shared copy that bypasses L1 (zero-filled when !ok); dst: a shared-window address, so
// that constant offsets fold into the instruction.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* gmem, bool ok) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

// ----------------------------------------------------------------------------------------------------
// TMA tiles (sm90; DecodeArgs::tma). A K or V block (16 rows x kHeadDim) is one tensor copy issued by lane 0
// of the warp, completing on the stage's mbarrier. The tensor maps see a cache as 5-D: (64 elements = one
// 128-byte line, kHeadDim / 64 lines, KV head, row, batch or page), box (64, kHeadDim / 64, 1, 16, 1), so
// that a box lands as 16 dense rows of kHeadDim elements in 128-byte swizzled lines: the 16-byte chunk c of
// line L (line L = row * kHeadDim / 64 + c / 8) sits at chunk c % 8 ^ L % 8 (the box base is 1024-byte
// aligned). Rows outside the tensor (a bad page or cache row: a coordinate out of range) arrive as zeros;
// rows past the sequence end inside the cache do not, so V's are zeroed after the wait (their P is 0, but
// the memory may hold NaN); K's scores are masked.
// ----------------------------------------------------------------------------------------------------

struct TmaMaps {  // CUtensorMap carries its own (128-byte) alignment
  CUtensorMap k, v;
};

// Where the TMA kernel's shared memory goes: the K / V stages (then the warps' O) first, 1024-byte aligned.
template <int kHeadDim, int kWarps_>
struct TmaTraits {
  using T = Traits<kHeadDim, kWarps_>;
  static constexpr int kLines = kHeadDim / 64;          // 128-byte lines per row
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kBoxBytes = kDecodeBlock * kRowBytes;  // one K or V block
  static constexpr int kStageBytes = 2 * kBoxBytes;
  static constexpr int kKVBytes = T::kWarps * T::kStages * kStageBytes;
  static constexpr int kScratchBytes = cmax(kKVBytes, T::kMergeBytes);
  static constexpr int kBarBytes = 8 * T::kWarps * T::kStages;
  static constexpr int kAlign = 1024;                   // the 128-byte swizzle repeats every 8 lines
  static constexpr int kSmemBytes = kAlign + kScratchBytes + T::kStatFloats * 4 + T::kQBytes + kBarBytes;
  static_assert(kHeadDim % 64 == 0, "TMA tiles need whole 128-byte lines");
  static_assert(kBoxBytes % kAlign == 0 && kScratchBytes % 16 == 0, "aligned boxes");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm90 SM has");
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(unsigned bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
// Box at (0, 0, c2, c3, c4) of the map into dst (shared), completing on bar.
__device__ __forceinline__ void tma_load_5d(unsigned dst, const CUtensorMap* map, unsigned bar, int c2, int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(0), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif

// A warp's walk through the page table of a paged cache, kStride keys per step: key j of the sequence
// (sk keys), page column col, row in the page. page_at(dj, dcol): the page dcol columns on, for key j + dj;
// -1 past the sequence end, past the table's columns or for an entry outside the cache (a bad page). Used
// by both ways of loading K / V (RowCursor, TmaCursor).
template <int kStride>
struct PageWalk {
  const int32_t* entry = nullptr;  // block_table[b][col]
  int page_size = 0, max_blocks = 0, pages = 0;
  int j = 0, sk = 0, col = 0, row = 0;

  __device__ __forceinline__ void init(const DecodeArgs& a, const CtaWork& w, int j0) {
    page_size = a.page_size, max_blocks = a.max_blocks, pages = a.cache_batch;
    j = j0;
    sk = w.s.sk;
    const int pos = w.s.leftpad + j0;
    col = pos / page_size;
    row = pos - col * page_size;
    entry = a.block_table + w.b * a.block_table_stride + col;
  }
  __device__ __forceinline__ int page_at(int dj, int dcol) const {
    if (j + dj >= sk || col + dcol >= max_blocks) return -1;
    const int p = __ldg(entry + dcol);
    return p >= 0 && p < pages ? p : -1;
  }
  __device__ __forceinline__ void step() {
    j += kStride;
    row += kStride;
    while (row >= page_size) row -= page_size, ++col, ++entry;
  }
};

// The (row, batch or page) coordinates of a warp's blocks: contiguous caches advance the row by a constant;
// paged ones walk the page table (PageWalk; host: no left padding, so that a block never spans two pages).
// -1: a bad cache row or page (out of the tensor: zeros).
template <bool kPaged, int kStride>
struct TmaCursor;

template <int kStride>
struct TmaCursor<false, kStride> {
  int row = 0, batch = 0;
  __device__ __forceinline__ void init(const DecodeArgs& a, const CtaWork& w, int j0) {
    batch = w.s.cache_row >= 0 && w.s.cache_row < a.cache_batch ? w.s.cache_row : -1;
    row = w.s.leftpad + j0;
  }
  __device__ __forceinline__ void advance() { row += kStride; }
};

template <int kStride>
struct TmaCursor<true, kStride> : PageWalk<kStride> {
  int batch = -1;  // the page (row: PageWalk's row in the page)
  __device__ __forceinline__ void init(const DecodeArgs& a, const CtaWork& w, int j0) {
    PageWalk<kStride>::init(a, w, j0);
    batch = this->page_at(0, 0);
  }
  __device__ __forceinline__ void advance() {
    this->step();
    batch = this->page_at(0, 0);
  }
};

// ----------------------------------------------------------------------------------------------------
// Stages of the kernel
// ----------------------------------------------------------------------------------------------------

// The Q tile (bf16 / fp16), loaded into registers first thing and stored into shared memory once the
// first K / V loads are issued. Rows past w.rows and dims past head_dim are zero. The loads are 16-byte
// (the host passes q with aligned rows, DecodeArgs::q) and branch-free, so that the compiler issues them
// before the cache lengths' loads and the work that waits on those: a chunk outside the tile loads chunk 0
// of row 0 (rows >= 1) and is zeroed.
template <int kHeadDim, int kWarps, typename Element>
struct QTile {
  using T = Traits<kHeadDim, kWarps>;
  static constexpr int kTileChunks = T::kRows * T::kChunks;  // 16-byte chunks of the tile
  static constexpr int kPerThread = (kTileChunks + T::kThreads - 1) / T::kThreads;
  uint4 v[kPerThread];

  __device__ __forceinline__ void load(const DecodeArgs& a, const CtaWork& w) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = threadIdx.x + i * T::kThreads, r = c / T::kChunks, ch = c % T::kChunks;
      const bool ok = c < kTileChunks && r < w.rows && ch * 8 < a.head_dim;
      const uint4 x = *reinterpret_cast<const uint4*>(chunk(a, w, ok ? r : 0, ok ? ch : 0));
      v[i] = ok ? x : make_uint4(0, 0, 0, 0);
    }
  }
  __device__ __forceinline__ void store(Element* q_s) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = threadIdx.x + i * T::kThreads, r = c / T::kChunks, ch = c % T::kChunks;
      if (c < kTileChunks) *reinterpret_cast<uint4*>(q_s + r * T::kRowElems + ch * 8) = v[i];
    }
  }

 private:
  __device__ __forceinline__ static const Element* chunk(const DecodeArgs& a, const CtaWork& w, int r, int ch) {
    const RowRef ref = row_ref(a, w, r);
    const int64_t qrow = a.cu_seqlens_q ? ref.row_g * a.q_row : w.b * a.q_batch + ref.i * a.q_row;
    return static_cast<const Element*>(a.q) + qrow + ref.h * a.q_head + ch * 8;
  }
};

// One warp's running softmax state over its rows g and g + 8 (thread-local fragments). m_run: running max
// of the scores in the log2 domain; l_run: this thread's share of the row sum (the quad adds them up at the
// end, merge_warps).
template <int kHeadDim>
struct WarpState {
  float acc[kHeadDim / 8][4];
  float m_run[2], l_run[2];

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    m_run[0] = m_run[1] = -INFINITY;
    l_run[0] = l_run[1] = 0.f;
  }
};

// ----------------------------------------------------------------------------------------------------
// Key rows of a warp's blocks. Per copy instruction, consecutive lanes take consecutive 16-byte chunks of
// the same key row, so one instruction of the warp reads whole rows (hdim 128: two rows of 256 bytes). A
// row of kChunks chunks is cut into power-of-two segments of at most 32 chunks (hdim 192: 16 + 8); in a
// segment of n chunks lane l copies chunk l % n of rows l / n + (32 / n) c, a constant stride apart from
// one row pointer (and at constant offsets in shared memory). A cursor walks the warp's blocks (kStride =
// Traits::kWarpStride keys apart); it is advanced right after a block is issued, so a page-table load has a
// whole block of compute to land.
// ----------------------------------------------------------------------------------------------------

// Where the 16 rows of one block live. Row r < split is at k1 + r * k_rb, a row r >= split (a block that
// crosses a page boundary) at k2 + r * k_rb; rows at or past `limit` (the sequence end) and rows of a bad
// page (ok1 / ok2 false) are zero-filled. The same for V.
struct BlockRows {
  const char* k1;
  const char* v1;
  const char* k2;
  const char* v2;
  int64_t k_rb, v_rb;
  int split, limit;
  bool ok1, ok2;
};

template <bool kPaged, int kStride>
struct RowCursor;

// Contiguous cache: one cache row per sequence; the block's row pointers advance by a constant.
template <int kStride>
struct RowCursor<false, kStride> {
  const char* k = nullptr;  // row 0 of the current block, plus the lane's offset (LaneCopies)
  const char* v = nullptr;
  int64_t k_rb = 0, v_rb = 0;  // bytes between key rows
  int j = 0, sk = 0;           // first key of the block, keys of the sequence
  bool seq_ok = false;

  template <typename Element>
  __device__ __forceinline__ void init(const DecodeArgs& a, const CtaWork& w, int j0, int64_t k_lane, int64_t v_lane) {
    seq_ok = w.s.cache_row >= 0 && w.s.cache_row < a.cache_batch;
    const int64_t row = seq_ok ? w.s.cache_row : 0, pos = w.s.leftpad + j0;
    k = reinterpret_cast<const char*>(static_cast<const Element*>(a.k) + row * a.k_batch + pos * a.k_row +
                                      w.hk * a.k_head) + k_lane;
    v = reinterpret_cast<const char*>(static_cast<const Element*>(a.v) + row * a.v_batch + pos * a.v_row +
                                      w.hk * a.v_head) + v_lane;
    k_rb = a.k_row * int64_t(sizeof(Element));
    v_rb = a.v_row * int64_t(sizeof(Element));
    j = j0;
    sk = w.s.sk;
  }
  __device__ __forceinline__ bool whole() const { return j + kDecodeBlock <= sk; }
  template <bool kWhole>
  __device__ __forceinline__ BlockRows rows() const {
    return {k, v, k, v, k_rb, v_rb, kDecodeBlock, sk - j, seq_ok, seq_ok};
  }
  __device__ __forceinline__ void advance() {
    j += kStride;
    k += kStride * k_rb;
    v += kStride * v_rb;
  }
};

// Paged cache: (table column, row in page) of the block's first key advance without a division; the
// page(s) of the next block are loaded ahead (-1: no such key or a bad page index, zero-filled). A block
// spans two pages only when the left padding is not a multiple of 16 (page sizes are).
template <int kStride>
struct RowCursor<true, kStride> : PageWalk<kStride> {
  using PageWalk<kStride>::page_size, PageWalk<kStride>::sk, PageWalk<kStride>::j, PageWalk<kStride>::row;
  const char* k0 = nullptr;  // page 0, row 0, plus the lane's offset (LaneCopies)
  const char* v0 = nullptr;
  int64_t k_page = 0, v_page = 0, k_rb = 0, v_rb = 0;
  int page = -1, page2 = -1;

  template <typename Element>
  __device__ __forceinline__ void init(const DecodeArgs& a, const CtaWork& w, int j0, int64_t k_lane, int64_t v_lane) {
    constexpr int64_t kBytes = sizeof(Element);
    k0 = reinterpret_cast<const char*>(static_cast<const Element*>(a.k) + w.hk * a.k_head) + k_lane;
    v0 = reinterpret_cast<const char*>(static_cast<const Element*>(a.v) + w.hk * a.v_head) + v_lane;
    k_page = a.k_batch * kBytes, v_page = a.v_batch * kBytes;
    k_rb = a.k_row * kBytes, v_rb = a.v_row * kBytes;
    PageWalk<kStride>::init(a, w, j0);
    lookup();
  }
  __device__ __forceinline__ void lookup() {
    const int split = page_size - row;
    page = this->page_at(0, 0);
    page2 = split < kDecodeBlock ? this->page_at(split, 1) : -1;
  }
  __device__ __forceinline__ bool whole() const { return row + kDecodeBlock <= page_size && j + kDecodeBlock <= sk; }
  // kWhole: whole() holds, the second page is not needed.
  template <bool kWhole>
  __device__ __forceinline__ BlockRows rows() const {
    const int split = page_size - row;
    const unsigned p1 = max(page, 0), r = row;  // unsigned: no sign extension in the products
    BlockRows b{k0 + p1 * k_page + r * k_rb, v0 + p1 * v_page + r * v_rb, nullptr, nullptr,
                k_rb, v_rb, split, sk - j, page >= 0, page2 >= 0};
    if constexpr (!kWhole) {
      const unsigned p2 = max(page2, 0);
      b.k2 = k0 + p2 * k_page - split * k_rb;
      b.v2 = v0 + p2 * v_page - split * v_rb;
    }
    return b;
  }
  __device__ __forceinline__ void advance() {
    this->step();
    lookup();
  }
};

// Segments of a row of `left` chunks: powers of two of at most 32 chunks (one warp instruction each).
constexpr int segment_chunks(int left) { return left >= 32 ? 32 : left >= 16 ? 16 : left >= 8 ? 8 : 4; }
constexpr int segments(int left) { return left <= 0 ? 0 : 1 + segments(left - segment_chunks(left)); }

// The lane's part of each segment, fixed for the whole loop: its first row r0 and chunk ch there, as
// byte offsets from a block's row 0 in the cache (k_off, v_off) and in a stage (s_off); ok: ch lies
// inside head_dim (always, unless the kernel is padded). The cursor's pointers include segment 0's
// cache offsets, so that rebase() leaves the other segments' offsets relative to it.
template <int kHeadDim, typename Element>
struct LaneCopies {
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kSegs = segments(kChunks);
  static constexpr int kRowBytes = Traits<kHeadDim>::kRowElems * sizeof(Element);
  static_assert(kChunks % 4 == 0, "head dim must be a multiple of 32 bytes");
  int64_t k_off[kSegs], v_off[kSegs];
  unsigned s_off[kSegs];
  int r0[kSegs];
  bool ok[kSegs];

  __device__ __forceinline__ void init(int lane, int64_t k_rb, int64_t v_rb, int head_dim) {
    int begin = 0;
#pragma unroll
    for (int s = 0; s < kSegs; ++s) {
      const int n = segment_chunks(kChunks - begin), ch = begin + lane % n;
      r0[s] = lane / n;
      k_off[s] = r0[s] * k_rb + ch * 16;
      v_off[s] = r0[s] * v_rb + ch * 16;
      s_off[s] = r0[s] * kRowBytes + ch * 16;
      ok[s] = ch * 8 < head_dim;
      begin += n;
    }
  }
  __device__ __forceinline__ void rebase() {
#pragma unroll
    for (int s = kSegs - 1; s >= 0; --s) k_off[s] -= k_off[0], v_off[s] -= v_off[0];
  }
};

// Segment kSeg (chunks [kBegin, kBegin + kLeft) of the rows) of one block into a stage (k_s / v_s: shared
// addresses of row 0, chunk 0 there), then the rest. kWhole: all 16 rows in one page and in the sequence.
template <int kSeg, int kBegin, int kLeft, bool kWhole, typename Plan>
__device__ __forceinline__ void issue_rows(const BlockRows& b, const Plan& p, unsigned k_s, unsigned v_s) {
  constexpr int kN = segment_chunks(kLeft), kR = 32 / kN;  // chunks per row here, rows per instruction
  constexpr int kRowBytes = Plan::kRowBytes;
  const char* k = b.k1 + p.k_off[kSeg];
  const char* v = b.v1 + p.v_off[kSeg];
  const unsigned kd = k_s + p.s_off[kSeg], vd = v_s + p.s_off[kSeg];
#pragma unroll
  for (int c = 0; c < kDecodeBlock / kR; ++c) {
    if constexpr (kWhole) {
      cp_async_16(kd + kR * c * kRowBytes, k + kR * c * b.k_rb, p.ok[kSeg] && b.ok1);
      cp_async_16(vd + kR * c * kRowBytes, v + kR * c * b.v_rb, p.ok[kSeg] && b.ok1);
    } else {
      const int r = p.r0[kSeg] + kR * c;
      const bool second = r >= b.split;
      const bool ok = p.ok[kSeg] && r < b.limit && (second ? b.ok2 : b.ok1);
      const char* ks = (second ? b.k2 : b.k1) + p.k_off[kSeg] + kR * c * b.k_rb;
      const char* vs = (second ? b.v2 : b.v1) + p.v_off[kSeg] + kR * c * b.v_rb;
      cp_async_16(kd + kR * c * kRowBytes, ks, ok);
      cp_async_16(vd + kR * c * kRowBytes, vs, ok);
    }
  }
  if constexpr (kLeft > kN) issue_rows<kSeg + 1, kBegin + kN, kLeft - kN, kWhole>(b, p, k_s, v_s);
}

// The block's K and V rows into a stage (k_s: its shared address); the cursor says where they are.
template <int kHeadDim, typename Element, typename Cursor>
__device__ __forceinline__ void issue_block(const Cursor& cur, const LaneCopies<kHeadDim, Element>& p, unsigned k_s) {
  using T = Traits<kHeadDim>;
  const unsigned v_s = k_s + T::kBlock * T::kRowElems * sizeof(Element);
  if (cur.whole()) {
    issue_rows<0, 0, T::kChunks, true>(cur.template rows<true>(), p, k_s, v_s);
  } else {
    issue_rows<0, 0, T::kChunks, false>(cur.template rows<false>(), p, k_s, v_s);
  }
}

// ----------------------------------------------------------------------------------------------------
// Scores and the online softmax of one block
// ----------------------------------------------------------------------------------------------------

// The general form of the scores (log2 domain): softcap, ALiBi, the window and the end of the sequence;
// invisible keys -inf. j0: key of element (nt = 0, e = 0) of this thread.
__device__ __forceinline__ void mask_scores(const DecodeArgs& a, float (&sc)[2][4], int j0, const int (&diag)[2],
                                            const float (&slope)[2], int sk) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int hr = i / 2, j = j0 + 8 * nt + i % 2;
      const bool visible = j < sk && (a.window_right < 0 || j <= diag[hr] + a.window_right) &&
                           (a.window_left < 0 || j >= diag[hr] - a.window_left);
      float x = sc[nt][i] * a.scale;
      if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
      x = x * kLog2e - slope[hr] * fabsf(float(diag[hr] - j));
      sc[nt][i] = visible ? x : -INFINITY;
    }
  }
}

// sc (log2 domain) -> P = exp2(sc - m_new), with the running max / sum / O of the rows updated. A row
// with nothing visible yet keeps m = -inf and exponentiates against 0. The O rescale (64 multiplies at
// hdim 128) is skipped when no row of the warp saw its max grow, the common case after a few blocks.
template <int kHeadDim>
__device__ __forceinline__ void online_softmax(float (&sc)[2][4], WarpState<kHeadDim>& st) {
  float alpha[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float mx = fmaxf(fmaxf(sc[0][2 * hr], sc[0][2 * hr + 1]), fmaxf(sc[1][2 * hr], sc[1][2 * hr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(st.m_run[hr], mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    alpha[hr] = exp2f(st.m_run[hr] - m_use);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float& x = sc[i / 2][2 * hr + i % 2];
      x = exp2f(x - m_use);
      sum += x;
    }
    st.l_run[hr] = st.l_run[hr] * alpha[hr] + sum;
    st.m_run[hr] = m_new;
  }
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) st.acc[nt][i] *= alpha[i / 2];
    }
  }
}

// This thread's accumulator rows g and g + 8 as the scores see them: the key of the diagonal and the ALiBi
// slope. The scores need the general form (mask_scores) for these features or a block past the sequence end.
struct ScoreRows {
  bool general;
  float scale_log2;
  int diag[2];
  float slope[2];

  __device__ __forceinline__ ScoreRows(const DecodeArgs& a, const CtaWork& w, int g)
      : general(a.softcap > 0.f || a.alibi != nullptr || a.window_left >= 0 || a.window_right >= 0),
        scale_log2(a.scale * kLog2e) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = g + 8 * hr;
      const RowRef ref = row_ref(a, w, r);
      diag[hr] = ref.i + w.offset;
      slope[hr] = (a.alibi && r < w.rows) ? a.alibi[w.b * a.alibi_batch_stride + ref.h] * kLog2e : 0.f;
    }
  }
  // S -> log2-domain scores of the block whose first key is key0 (t4: this thread's column pair).
  __device__ __forceinline__ void apply(const DecodeArgs& a, float (&sc)[2][4], int key0, int t4, int sk) const {
    if (general || key0 + kDecodeBlock > sk) {
      mask_scores(a, sc, key0 + 2 * t4, diag, slope, sk);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) sc[i / 4][i % 4] *= scale_log2;
    }
  }
};

// ----------------------------------------------------------------------------------------------------
// The warp's main loop
// ----------------------------------------------------------------------------------------------------

// The A fragments of Q for every k-slice: held in registers for the whole loop up to hdim 128 (32
// registers), read from shared memory per block above (the O accumulators need the registers there).
template <int kHeadDim, bool kHold = (kHeadDim <= 128)>
struct QFragments {
  uint32_t r[kHeadDim / 16][4];
  template <typename T>
  __device__ __forceinline__ void load(const T* q_frag) {
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) ldsm_x4(q_frag + kk * 16, r[kk]);
  }
  template <typename T>
  __device__ __forceinline__ const uint32_t (&frag(const T*, int kk))[4] { return r[kk]; }
};
template <int kHeadDim>
struct QFragments<kHeadDim, false> {
  uint32_t r[4];
  template <typename T>
  __device__ __forceinline__ void load(const T*) {}
  template <typename T>
  __device__ __forceinline__ const uint32_t (&frag(const T* q_frag, int kk))[4] {
    ldsm_x4(q_frag + kk * 16, r);
    return r;
  }
};

// One block of 16 keys, whichever way K / V reached shared memory: k_frag(kk, kb) / v_frag(np, vb) load the
// B fragments of k-slice kk of K and of column pair np of V. S = Q K^T (16 rows x 16 keys: two n-tiles of 8
// keys; the even and odd k-slices in separate accumulators, half the chain of dependent mma per block: a
// warp's time per block is latency), the scores, the online softmax, O += P V with P (16 x 16 keys) as the
// A operand straight from the S fragments.
template <int kHeadDim, typename Element, typename KFrag, typename VFrag>
__device__ __forceinline__ void attend_block(const DecodeArgs& a, const ScoreRows& rows, QFragments<kHeadDim>& q_regs,
                                             const Element* q_frag, KFrag&& k_frag, VFrag&& v_frag, int key0, int sk,
                                             WarpState<kHeadDim>& st) {
  float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  float sc_odd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    uint32_t kb[4];
    k_frag(kk, kb);
    const uint32_t(&qa)[4] = q_regs.frag(q_frag, kk);
    float(&acc)[2][4] = kk % 2 ? sc_odd : sc;
    mma<Element>(acc[0], qa, kb[0], kb[1]);
    mma<Element>(acc[1], qa, kb[2], kb[3]);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) sc[i / 4][i % 4] += sc_odd[i / 4][i % 4];

  rows.apply(a, sc, key0, threadIdx.x % 4, sk);
  online_softmax<kHeadDim>(sc, st);

  const uint32_t pa[4] = {pack2(sc[0][0], sc[0][1], Element()), pack2(sc[0][2], sc[0][3], Element()),
                          pack2(sc[1][0], sc[1][1], Element()), pack2(sc[1][2], sc[1][3], Element())};
#pragma unroll
  for (int np = 0; np < kHeadDim / 16; ++np) {
    uint32_t vb[4];
    v_frag(np, vb);
    mma<Element>(st.acc[2 * np], pa, vb[0], vb[1]);
    mma<Element>(st.acc[2 * np + 1], pa, vb[2], vb[3]);
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// attend() with TMA tiles (TmaTraits): per warp kStages stages of (K box, V box), one mbarrier each; lane 0
// issues a block's two tensor copies, every lane waits on the stage's phase. The ldmatrix addresses follow
// the 128-byte swizzle: a lane's row R and its chunk bit b (c = 2 kk + b) give a base address whose bits 4-6
// hold b ^ (R * kLines) % 8, and k-slice kk adds (2 (kk % 4) ^ kk / 4) to those bits (an XOR) and line
// kk / 4 (an offset), so one LOP3 per ldmatrix.
template <int kHeadDim, int kWarps, typename Element, bool kPaged>
__device__ __forceinline__ void attend_tma(const DecodeArgs& a, const CtaWork& w, const QTile<kHeadDim, kWarps, Element>& q,
                                           Element* q_s, Element* kv_s, WarpState<kHeadDim>& st, const TmaMaps* maps,
                                           uint64_t* bars) {
  using T = Traits<kHeadDim, kWarps>;
  using TT = TmaTraits<kHeadDim, kWarps>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int span = w.k_end - w.k_begin;
  const int my_blocks = span > warp ? (span - warp + T::kWarps - 1) / T::kWarps : 0;
  const int first_key = (w.k_begin + warp) * T::kBlock;
  const ScoreRows rows(a, w, lane / 4);

  const unsigned warp_kv_s = smem_addr(kv_s) + warp * T::kStages * TT::kStageBytes;
  const unsigned warp_bar = smem_addr(bars + warp * T::kStages);
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < T::kStages; ++s) mbar_init(warp_bar + 8 * s, 1);
    mbar_init_fence();
  }
  __syncwarp();
  TmaCursor<kPaged, T::kWarpStride> cur;
  cur.init(a, w, first_key);
  const int hk = w.hk;
  auto issue = [&](int stage) {
    if (lane == 0) {
      const unsigned dst = warp_kv_s + stage * TT::kStageBytes, bar = warp_bar + 8 * stage;
      mbar_expect_tx(bar, TT::kStageBytes);
      tma_load_5d(dst, &maps->k, bar, hk, cur.row, cur.batch);
      tma_load_5d(dst + TT::kBoxBytes, &maps->v, bar, hk, cur.row, cur.batch);
    }
    cur.advance();
  };

#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < my_blocks) issue(s);
  }
  q.store(q_s);
  __syncthreads();  // q_s

  st.reset();
  const int lm = lane / 8, lr = lane % 8;
  const Element* q_frag = q_s + (lr + 8 * (lm % 2)) * T::kRowElems + 8 * (lm / 2);
  const int rk = lr + 8 * (lm / 2), rv = lr + 8 * (lm % 2);  // the lane's K / V row for ldmatrix
  const unsigned k_lane = rk * TT::kRowBytes + 16 * ((lm % 2) ^ ((rk * TT::kLines) % 8));
  const unsigned v_lane = TT::kBoxBytes + rv * TT::kRowBytes + 16 * ((lm / 2) ^ ((rv * TT::kLines) % 8));
  QFragments<kHeadDim> q_regs;
  q_regs.load(q_frag);

  for (int n = 0; n < my_blocks; ++n) {
    __syncwarp();  // every lane is done with the stage refilled below
    const int fill = n + T::kStages - 1;
    if (fill < my_blocks) issue(fill % T::kStages);
    const int sidx = n % T::kStages;
    mbar_wait(warp_bar + 8 * sidx, (n / T::kStages) & 1);
    const unsigned stage = warp_kv_s + sidx * TT::kStageBytes;
    const int key0 = first_key + n * T::kWarpStride;
    if (key0 + T::kBlock > w.s.sk) {  // the sequence's last block: V rows past the end -> 0
      const int keep = max(w.s.sk - key0, 0);
      constexpr int kRowChunks = TT::kRowBytes / 16;
      uint4* v_box = reinterpret_cast<uint4*>(reinterpret_cast<char*>(kv_s) +
                                              (warp * T::kStages + sidx) * TT::kStageBytes + TT::kBoxBytes);
      for (int c = keep * kRowChunks + lane; c < T::kBlock * kRowChunks; c += 32) v_box[c] = make_uint4(0, 0, 0, 0);
      fence_proxy_async_smem();
      __syncwarp();
    }

    const unsigned k_addr = stage + k_lane, v_addr = stage + v_lane;
    attend_block<kHeadDim, Element>(
        a, rows, q_regs, q_frag,
        [&](int kk, uint32_t(&kb)[4]) { ldsm_x4_at((k_addr ^ (16 * ((2 * (kk % 4)) ^ (kk / 4)))) + 128 * (kk / 4), kb); },
        [&](int np, uint32_t(&vb)[4]) {
          ldsm_x4_trans_at((v_addr ^ (16 * ((2 * (np % 4)) ^ (np / 4)))) + 128 * (np / 4), vb);
        },
        key0, w.s.sk, st);
  }
}
#endif

// The warp's key blocks: K / V through a private cp.async pipeline (kTma: TMA tiles on the stage's mbarrier,
// maps / bars), online softmax, O += P V. q: the Q tile in flight (QTile::load), stored into q_s here.
template <int kHeadDim, int kWarps, typename Element, bool kPaged, bool kTma = false>
__device__ __forceinline__ void attend(const DecodeArgs& a, const CtaWork& w, const QTile<kHeadDim, kWarps, Element>& q,
                                       Element* q_s, Element* kv_s, WarpState<kHeadDim>& st,
                                       const TmaMaps* maps = nullptr, uint64_t* bars = nullptr) {
  if constexpr (kTma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    attend_tma<kHeadDim, kWarps, Element, kPaged>(a, w, q, q_s, kv_s, st, maps, bars);
#endif
    return;
  }
  using T = Traits<kHeadDim, kWarps>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int span = w.k_end - w.k_begin;
  const int my_blocks = span > warp ? (span - warp + T::kWarps - 1) / T::kWarps : 0;
  const int first_key = (w.k_begin + warp) * T::kBlock;
  const ScoreRows rows(a, w, lane / 4);

  LaneCopies<kHeadDim, Element> copies;
  copies.init(lane, a.k_row * int64_t(sizeof(Element)), a.v_row * int64_t(sizeof(Element)), a.head_dim);
  RowCursor<kPaged, T::kWarpStride> cur;
  cur.template init<Element>(a, w, first_key, copies.k_off[0], copies.v_off[0]);
  copies.rebase();
  Element* warp_kv = kv_s + warp * T::kStages * T::kStageElems;
  const unsigned warp_kv_s = smem_addr(warp_kv);
  auto issue = [&](int stage) {
    issue_block<kHeadDim, Element>(cur, copies, warp_kv_s + stage * T::kStageElems * sizeof(Element));
    cur.advance();
  };

  // Prologue: the first stages are in flight before Q is stored (its loads have to land first).
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < my_blocks) issue(s);
    cp_async_commit();
  }
  q.store(q_s);
  __syncthreads();  // q_s

  st.reset();
  // ldmatrix row addresses: lane -> (matrix lane / 8, row lane % 8).
  const int lm = lane / 8, lr = lane % 8;
  const Element* q_frag = q_s + (lr + 8 * (lm % 2)) * T::kRowElems + 8 * (lm / 2);
  const int k_frag_off = (lr + 8 * (lm / 2)) * T::kRowElems + 8 * (lm % 2);
  const int v_frag_off = T::kBlock * T::kRowElems + (lr + 8 * (lm % 2)) * T::kRowElems + 8 * (lm / 2);
  QFragments<kHeadDim> q_regs;
  q_regs.load(q_frag);

  for (int n = 0; n < my_blocks; ++n) {
    __syncwarp();  // every lane is done with the stage refilled below
    const int fill = n + T::kStages - 1;
    if (fill < my_blocks) issue(fill % T::kStages);
    cp_async_commit();
    cp_async_wait<T::kStages - 1>();
    __syncwarp();
    const Element* stage = warp_kv + (n % T::kStages) * T::kStageElems;
    attend_block<kHeadDim, Element>(
        a, rows, q_regs, q_frag, [&](int kk, uint32_t(&kb)[4]) { ldsm_x4(stage + k_frag_off + kk * 16, kb); },
        [&](int np, uint32_t(&vb)[4]) { ldsm_x4_trans(stage + v_frag_off + np * 16, vb); },
        first_key + n * T::kWarpStride, w.s.sk, st);
  }
  cp_async_wait<0>();
}

// Merges the warps in warp order: the (max, sum) of each row into m_s / l_s (log2 domain) and each warp's
// rescaled O into merge[warp][row][kHeadDim] (the K/V buffers, now free).
template <int kHeadDim, int kWarps>
__device__ __forceinline__ void merge_warps(WarpState<kHeadDim>& st, float* stats, float* merge) {
  using T = Traits<kHeadDim, kWarps>;
  constexpr int kRows = T::kRows;
  float* wm_s = stats;                     // [warp][16] running max (log2)
  float* wl_s = wm_s + T::kWarps * kRows;  // [warp][16] row sums
  float* m_s = wl_s + T::kWarps * kRows;   // [16]
  float* l_s = m_s + kRows;                // [16]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    st.l_run[hr] += __shfl_xor_sync(0xffffffffu, st.l_run[hr], 1);
    st.l_run[hr] += __shfl_xor_sync(0xffffffffu, st.l_run[hr], 2);
    if (t4 == 0) {
      wm_s[warp * kRows + g + 8 * hr] = st.m_run[hr];
      wl_s[warp * kRows + g + 8 * hr] = st.l_run[hr];
    }
  }
  __syncthreads();  // also: every warp is done with its K/V buffers, reused below
  if (tid < kRows) {
    float m = -INFINITY, l = 0.f;
#pragma unroll
    for (int wi = 0; wi < T::kWarps; ++wi) m = fmaxf(m, wm_s[wi * kRows + tid]);
#pragma unroll
    for (int wi = 0; wi < T::kWarps; ++wi) {
      const float mw = wm_s[wi * kRows + tid];
      l += mw == -INFINITY ? 0.f : wl_s[wi * kRows + tid] * exp2f(mw - m);
    }
    m_s[tid] = m;
    l_s[tid] = l;
  }
  __syncthreads();
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = g + 8 * hr;
    const float scale = st.m_run[hr] == -INFINITY ? 0.f : exp2f(st.m_run[hr] - m_s[r]);
    float* dst = merge + (warp * kRows + r) * kHeadDim + 2 * t4;
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) {
      *reinterpret_cast<float2*>(dst + 8 * nt) = make_float2(st.acc[nt][2 * hr] * scale, st.acc[nt][2 * hr + 1] * scale);
    }
  }
  __syncthreads();
}

// Element (r, d) of the CTA's O: the sum of the warps' rescaled parts in merge (merge_warps).
template <int kHeadDim, int kWarps>
__device__ __forceinline__ float warp_sum(const float* merge, int r, int d) {
  float o = 0.f;
#pragma unroll
  for (int wi = 0; wi < kWarps; ++wi) o += merge[(wi * kDecodeRows + r) * kHeadDim + d];
  return o;
}

// Writes the CTA's result: the output + lse (one split) or the fp32 partials of its split.
template <int kHeadDim, int kWarps, typename Element>
__device__ __forceinline__ void store_result(const DecodeArgs& a, const CtaWork& w, const float* stats,
                                             const float* merge) {
  using T = Traits<kHeadDim, kWarps>;
  constexpr int kRows = T::kRows;
  const float* m_s = stats + 2 * T::kWarps * kRows;
  const float* l_s = m_s + kRows;
  const bool final = a.num_splits == 1;
  for (int idx = threadIdx.x; idx < w.rows * a.head_dim; idx += T::kThreads) {
    const int r = idx / a.head_dim, d = idx % a.head_dim;
    const float l = l_s[r];
    const float o = l > 0.f ? warp_sum<kHeadDim, kWarps>(merge, r, d) / l : 0.f;
    const RowRef ref = row_ref(a, w, r);
    if (final) {
      store_float(static_cast<Element*>(a.out) + out_offset(a, w, ref) + d, o);
    } else {
      a.out_accum[((w.split * a.total_rows + ref.row_g) * a.heads + ref.h) * a.head_dim + d] = o;
    }
  }
  if (threadIdx.x < w.rows) {
    const RowRef ref = row_ref(a, w, threadIdx.x);
    const float l = l_s[threadIdx.x];
    const float lse = l > 0.f ? m_s[threadIdx.x] * kLn2 + logf(l) : (final ? INFINITY : -INFINITY);
    if (final) {
      a.lse[lse_index(a, w, ref)] = lse;
    } else {
      a.lse_accum[(w.split * a.total_rows + ref.row_g) * a.heads + ref.h] = lse;
    }
  }
}

// Split merge, run by the last CTA of the splits of (b, blockIdx.x) to arrive (an atomic counter orders
// the arrivals). A thread merges 4 columns of one row over the splits, in split order (deterministic), as
// an online softmax over the splits' (lse, O) pairs; it reads the lse and the partial O of 8 splits at once
// (one L2 round trip per 8 splits, no block barrier):
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) out_s.
template <int kHeadDim, int kWarps, typename Element>
__device__ __forceinline__ void merge_splits(const DecodeArgs& a, const CtaWork& w, float* stats) {
  using T = Traits<kHeadDim, kWarps>;
  int* last = reinterpret_cast<int*>(stats + T::kStatFloats - 4);
  __threadfence();  // this CTA's partials are visible device-wide before it counts itself in
  __syncthreads();
  if (threadIdx.x == 0) *last = atomicAdd(&a.counters[blockIdx.z * gridDim.x + blockIdx.x], 1) == a.num_splits - 1;
  __syncthreads();
  if (!*last) return;
  __threadfence();

  constexpr int kChunk = 8;
  const int quads = a.head_dim / 4;
  const int64_t o_split = a.total_rows * a.heads * a.head_dim, l_split = a.total_rows * a.heads;
  for (int e = threadIdx.x; e < w.rows * quads; e += T::kThreads) {
    const int r = e / quads, d = e % quads * 4;
    const RowRef ref = row_ref(a, w, r);
    const float* lse_src = a.lse_accum + ref.row_g * a.heads + ref.h;
    const float4* o_src = reinterpret_cast<const float4*>(a.out_accum + (ref.row_g * a.heads + ref.h) * a.head_dim + d);
    float m = -INFINITY, sum = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < a.num_splits; s0 += kChunk) {
      float lse[kChunk];
      float4 x[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const bool ok = s0 + i < a.num_splits;
        lse[i] = ok ? __ldcg(lse_src + (s0 + i) * l_split) : -INFINITY;
        x[i] = ok ? __ldcg(o_src + (s0 + i) * (o_split / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (lse[i] == -INFINITY) continue;  // a split that saw no key (or past the last split)
        const float m_new = fmaxf(m, lse[i]);
        const float c_old = __expf(m - m_new), c_new = __expf(lse[i] - m_new);
        sum = sum * c_old + c_new;
        o.x = o.x * c_old + c_new * x[i].x, o.y = o.y * c_old + c_new * x[i].y;
        o.z = o.z * c_old + c_new * x[i].z, o.w = o.w * c_old + c_new * x[i].w;
        m = m_new;
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    Element* dst = static_cast<Element*>(a.out) + out_offset(a, w, ref) + d;
    store_float(dst, o.x * inv), store_float(dst + 1, o.y * inv);
    store_float(dst + 2, o.z * inv), store_float(dst + 3, o.w * inv);
    if (d == 0) a.lse[lse_index(a, w, ref)] = sum > 0.f ? m + logf(sum) : INFINITY;
  }
}

// Split merge of a cluster launch (a.cluster; sm90): the splits of (b, blockIdx.x) are the CTAs of one
// cluster, ranked by split. Each CTA first sums its warps' O (relative to its own row max) in place; after
// a cluster barrier, the CTA of rank c merges the c-th run of kThreads elements of the (rows x head_dim)
// output (then the (c + S)-th, ..., S = num_splits) from every split's shared memory, in split order
// (deterministic). A thread reads the (max, sum, O) of all splits first (one round trip of distributed
// shared memory, not one per split). A second barrier keeps each CTA's shared memory alive until its peers
// have read it.
template <int kHeadDim, int kWarps, typename Element>
__device__ __forceinline__ void merge_cluster(const DecodeArgs& a, const CtaWork& w, float* stats, float* merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using T = Traits<kHeadDim, kWarps>;
  constexpr int kRows = T::kRows, kMax = kMaxClusterSplits;
  const int d_len = a.head_dim;
  for (int idx = threadIdx.x; idx < w.rows * d_len; idx += T::kThreads) {
    const int r = idx / d_len, d = idx % d_len;
    merge[r * kHeadDim + d] = warp_sum<kHeadDim, kWarps>(merge, r, d);  // warp 0's slot: only this thread uses (r, d)
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int splits = a.num_splits, rank = static_cast<int>(cluster.block_rank());
  const float* m_local = stats + 2 * T::kWarps * kRows;  // merged (max, sum) of this CTA's rows
  for (int idx = rank * T::kThreads + threadIdx.x; idx < w.rows * d_len; idx += splits * T::kThreads) {
    const int r = idx / d_len, d = idx % d_len;
    float ms[kMax], ls[kMax], os[kMax];
#pragma unroll
    for (int s = 0; s < kMax; ++s) {
      const int peer = s < splits ? s : 0;
      const float* peer_stats = cluster.map_shared_rank(m_local, peer);
      ms[s] = s < splits ? peer_stats[r] : -INFINITY;
      ls[s] = peer_stats[kRows + r];
      os[s] = cluster.map_shared_rank(merge, peer)[r * kHeadDim + d];
    }
    float m = -INFINITY, l = 0.f, o = 0.f;
#pragma unroll
    for (int s = 0; s < kMax; ++s) {
      if (ms[s] == -INFINITY) continue;  // the split saw no key of this row (or is past the last split)
      const float m_new = fmaxf(m, ms[s]);
      const float c_old = exp2f(m - m_new), c_new = exp2f(ms[s] - m_new);
      l = l * c_old + ls[s] * c_new;
      o = o * c_old + os[s] * c_new;
      m = m_new;
    }
    const RowRef ref = row_ref(a, w, r);
    store_float(static_cast<Element*>(a.out) + out_offset(a, w, ref) + d, l > 0.f ? o / l : 0.f);
    if (d == 0) a.lse[lse_index(a, w, ref)] = l > 0.f ? m * kLn2 + logf(l) : INFINITY;
  }
  cluster.sync();
#else
  __trap();  // cluster launches are sm90-only (the host never asks for one elsewhere)
#endif
}

// ----------------------------------------------------------------------------------------------------
// The kernel and its launch
// ----------------------------------------------------------------------------------------------------

// One CTA: the Q tile's loads go out first, then the cache lengths (both in flight together), the warps'
// main loops, their merge, and the split merge or the output.
// kTma: K / V by TMA tiles (maps); the shared memory then starts with the 1024-byte aligned stages
// (TmaTraits), followed by the statistics, the Q tile and the mbarriers.
template <int kHeadDim, int kWarps, typename Element, bool kPaged, bool kTma = false>
__device__ __forceinline__ void decode_cta(const DecodeArgs& a, const TmaMaps* maps = nullptr) {
  using T = Traits<kHeadDim, kWarps>;
  extern __shared__ __align__(16) char smem[];
  float* stats;
  char* scratch;  // K/V stages, then the warps' O
  Element* q_s;
  uint64_t* bars = nullptr;
  if constexpr (kTma) {
    using TT = TmaTraits<kHeadDim, kWarps>;
    scratch = smem + ((TT::kAlign - smem_addr(smem) % TT::kAlign) % TT::kAlign);
    stats = reinterpret_cast<float*>(scratch + TT::kScratchBytes);
    q_s = reinterpret_cast<Element*>(scratch + TT::kScratchBytes + T::kStatFloats * 4);
    bars = reinterpret_cast<uint64_t*>(scratch + TT::kScratchBytes + T::kStatFloats * 4 + T::kQBytes);
  } else {
    stats = reinterpret_cast<float*>(smem);
    scratch = smem + T::kStatFloats * 4;
    q_s = reinterpret_cast<Element*>(scratch + T::kScratchBytes);
  }

  CtaWork w = cta_rows(a);
  if (w.rows <= 0) return;  // the same for every CTA of (b, blockIdx.x): no merge is waiting on it
  QTile<kHeadDim, kWarps, Element> q;
  q.load(a, w);
  cta_keys<kWarps>(a, w);
  WarpState<kHeadDim> st;
  attend<kHeadDim, kWarps, Element, kPaged, kTma>(a, w, q, q_s, reinterpret_cast<Element*>(scratch), st, maps, bars);
  merge_warps<kHeadDim, kWarps>(st, stats, reinterpret_cast<float*>(scratch));
  if (a.cluster) {
    merge_cluster<kHeadDim, kWarps, Element>(a, w, stats, reinterpret_cast<float*>(scratch));
    return;
  }
  store_result<kHeadDim, kWarps, Element>(a, w, stats, reinterpret_cast<const float*>(scratch));
  if (a.num_splits > 1) merge_splits<kHeadDim, kWarps, Element>(a, w, stats);
}

// The wide and narrow CTAs run on sm90 only (the host picks them there): other archs get a stub, which
// keeps their compile time and code size as before.
template <int kWarps>
__device__ constexpr bool compiled_for_this_arch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return kWarps == kDecodeWarps;
#else
  return true;
#endif
}

template <int kHeadDim, typename Element, bool kPaged, int kWarps>
__global__ void __launch_bounds__(Traits<kHeadDim, kWarps>::kThreads) decode_kernel(const DecodeArgs a) {
  if constexpr (compiled_for_this_arch<kWarps>()) {
    decode_cta<kHeadDim, kWarps, Element, kPaged>(a);
  } else {
    __trap();
  }
}

// The TMA-tile kernel (DecodeArgs::tma): sm90 only, elsewhere a stub (the host never picks it there).
template <int kHeadDim, typename Element, bool kPaged, int kWarps>
__global__ void __launch_bounds__(Traits<kHeadDim, kWarps>::kThreads)
    decode_kernel_tma(const DecodeArgs a, const __grid_constant__ TmaMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) tma_prefetch_map(&maps.k), tma_prefetch_map(&maps.v);
  decode_cta<kHeadDim, kWarps, Element, kPaged, true>(a, &maps);
#else
  __trap();
#endif
}

// The kernel and its shared memory for (kTma, ...).
template <int kHeadDim, typename Element, bool kPaged, int kWarps, bool kTma>
struct KernelOf {
  static constexpr int kSmemBytes = Traits<kHeadDim, kWarps>::kSmemBytes;
  static constexpr auto kernel = decode_kernel<kHeadDim, Element, kPaged, kWarps>;
};
template <int kHeadDim, typename Element, bool kPaged, int kWarps>
struct KernelOf<kHeadDim, Element, kPaged, kWarps, true> {
  static constexpr int kSmemBytes = TmaTraits<kHeadDim, kWarps>::kSmemBytes;
  static constexpr auto kernel = decode_kernel_tma<kHeadDim, Element, kPaged, kWarps>;
};

// Dynamic shared memory above 48 KB.
template <int kHeadDim, typename Element, bool kPaged, int kWarps, bool kTma = false>
cudaError_t configure() {
  using K = KernelOf<kHeadDim, Element, kPaged, kWarps, kTma>;
  return cudaFuncSetAttribute(K::kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
}

template <int kHeadDim, typename Element, bool kPaged, int kWarps, bool kTma, typename... Extra>
Status launch(const DecodeArgs& a, cudaStream_t stream, const Extra&... extra) {
  using T = Traits<kHeadDim, kWarps>;
  using K = KernelOf<kHeadDim, Element, kPaged, kWarps, kTma>;
  auto* kernel = K::kernel;
  cudaError_t err = configure<kHeadDim, Element, kPaged, kWarps, kTma>();
  if (err != cudaSuccess) return Status::CudaError(std::string("decode kernel setup: ") + cudaGetErrorString(err));
  const dim3 grid(ctas_per_split(a), a.num_splits, a.batch);
  if (a.cluster) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(T::kThreads);
    config.dynamicSmemBytes = K::kSmemBytes;
    config.stream = stream;
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1, cluster.val.clusterDim.y = a.num_splits, cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    err = cudaLaunchKernelEx(&config, kernel, a, extra...);
  } else {
    kernel<<<grid, T::kThreads, K::kSmemBytes, stream>>>(a, extra...);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return Status::CudaError(std::string("decode kernel launch: ") + cudaGetErrorString(err));
  return Status::Ok();
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda); null if absent.
using TensorMapEncoder = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                      const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                      CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return TensorMapEncoder(nullptr);
    }
    return reinterpret_cast<TensorMapEncoder>(fn);
  }();
  return encoder;
}

// The map of one cache (TmaTraits: 5-D, box (64, kHeadDim / 64, 1, 16, 1), 128-byte swizzle; rows: the
// rows of a page or of a contiguous cache row). Strides in elements; false when the driver refuses them.
template <int kHeadDim, typename Element>
bool encode_cache_map(CUtensorMap* map, const void* base, int64_t head, int64_t row, int64_t batch, const DecodeArgs& a) {
  const TensorMapEncoder encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  constexpr int64_t kBytes = sizeof(Element);
  const cuuint64_t dims[5] = {64, cuuint64_t(kHeadDim / 64), cuuint64_t(a.heads_k), cuuint64_t(a.page_size),
                              cuuint64_t(a.cache_batch)};
  const cuuint64_t strides[4] = {128, cuuint64_t(head * kBytes), cuuint64_t(row * kBytes), cuuint64_t(batch * kBytes)};
  const cuuint32_t box[5] = {64, cuuint32_t(kHeadDim / 64), 1, cuuint32_t(kDecodeBlock), 1};
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType type =
      std::is_same_v<Element, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 5, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B,  // 256 B: 0.3-9 % slower, none: the same (NOTES, session 7)
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int kHeadDim, typename Element, int kWarps>
Status launch(const DecodeArgs& a, cudaStream_t stream) {
  if constexpr (kHeadDim % 64 == 0) {
    // TMA tiles where asked for and where they hold: the whole head dim (no padded kernel), every block in
    // one page (no left padding; page sizes are multiples of 16), and maps the driver accepts.
    const bool fits = a.tma && a.head_dim == kHeadDim && a.page_size > 0 &&
                      (a.block_table == nullptr || (a.cache_leftpad == nullptr && a.page_size % kDecodeBlock == 0));
    TmaMaps maps;
    if (fits && encode_cache_map<kHeadDim, Element>(&maps.k, a.k, a.k_head, a.k_row, a.k_batch, a) &&
        encode_cache_map<kHeadDim, Element>(&maps.v, a.v, a.v_head, a.v_row, a.v_batch, a)) {
      return a.block_table ? launch<kHeadDim, Element, true, kWarps, true>(a, stream, maps)
                           : launch<kHeadDim, Element, false, kWarps, true>(a, stream, maps);
    }
  }
  return a.block_table ? launch<kHeadDim, Element, true, kWarps, false>(a, stream)
                       : launch<kHeadDim, Element, false, kWarps, false>(a, stream);
}

// Paged and contiguous caches have their own kernels (RowCursor), and so have the three CTA widths and
// the two ways of loading K / V (cp.async rows, TMA tiles).
template <int kHeadDim, typename Element>
Status DecodeKernel<kHeadDim, Element>::run(const DecodeArgs& a, cudaStream_t stream) {
  if (a.warps == kDecodeWarps) return launch<kHeadDim, Element, kDecodeWarps>(a, stream);
  if constexpr (kHasWide) {
    if (a.warps == kDecodeWarpsWide) return launch<kHeadDim, Element, kDecodeWarpsWide>(a, stream);
  }
  if constexpr (kHasNarrow) {
    if (a.warps == kDecodeWarpsNarrow) return launch<kHeadDim, Element, kDecodeWarpsNarrow>(a, stream);
  }
  return Status::Internal("decode kernel: no CTA of " + std::to_string(a.warps) + " warps for head dim " +
                          std::to_string(kHeadDim));
}

template <int kHeadDim, int kWarps>
constexpr int smem_either() {
  if constexpr (kHeadDim % 64 == 0) {
    return cmax(Traits<kHeadDim, kWarps>::kSmemBytes, TmaTraits<kHeadDim, kWarps>::kSmemBytes);
  } else {
    return Traits<kHeadDim, kWarps>::kSmemBytes;
  }
}

template <int kHeadDim, typename Element>
int DecodeKernel<kHeadDim, Element>::smem_bytes(int warps) {
  // The larger of the two K / V paths' (the TMA kernel's is smaller at every built head dim; max for safety).
  if constexpr (kHasWide) {
    if (warps == kDecodeWarpsWide) return smem_either<kHeadDim, kDecodeWarpsWide>();
  }
  if constexpr (kHasNarrow) {
    if (warps == kDecodeWarpsNarrow) return smem_either<kHeadDim, kDecodeWarpsNarrow>();
  }
  return smem_either<kHeadDim, kDecodeWarps>();
}

// Cached per process (the first device that asks; a launch-plan hint only, never a correctness input).
template <int kHeadDim, typename Element, int kWarps, bool kTma>
int resident_ctas() {
  using K = KernelOf<kHeadDim, Element, false, kWarps, kTma>;
  static std::atomic<int> known{0};
  int n = known.load(std::memory_order_relaxed);
  if (n > 0) return n;
  if (configure<kHeadDim, Element, false, kWarps, kTma>() != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, K::kernel, Traits<kHeadDim, kWarps>::kThreads,
                                                    K::kSmemBytes) != cudaSuccess) {
    cudaGetLastError();  // clear the error so that the next launch reports its own
    return 0;
  }
  known.store(n, std::memory_order_relaxed);
  return n;
}

template <int kHeadDim, typename Element>
int DecodeKernel<kHeadDim, Element>::ctas_per_sm(int warps) {
  if constexpr (kHasNarrow) {
    if (warps == kDecodeWarpsNarrow) return resident_ctas<kHeadDim, Element, kDecodeWarpsNarrow, true>();
  }
  return resident_ctas<kHeadDim, Element, kDecodeWarps, false>();
}

// Cached per process like ctas_per_sm (every call plans with it); a first device of another arch can only
// make it smaller, which keeps the sm90-only plans off, never on where they cannot run.
template <int kHeadDim, typename Element>
int DecodeKernel<kHeadDim, Element>::arch_major() {
  static std::atomic<int> known{0};
  int major = known.load(std::memory_order_relaxed);
  if (major > 0) return major;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, decode_kernel<kHeadDim, Element, false, kDecodeWarps>) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  major = attr.ptxVersion / 10;  // the virtual architecture the code came from (its __CUDA_ARCH__)
  known.store(major, std::memory_order_relaxed);
  return major;
}

}  // namespace flash_attention::cuda::decode
