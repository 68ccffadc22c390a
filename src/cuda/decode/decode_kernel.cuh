// Split-KV attention over a (paged) KV cache on the tensor cores (mma.sync m16n8k16, CuTe atoms).
//
// One CTA (4 warps) = (16 packed query rows of one KV head, split, batch): row r = query index r / G,
// head hk * G + r % G, so every K/V byte read serves the whole GQA group. The CTA's key range is cut
// into blocks of 16 keys; warp w takes blocks w, w + 4, ... and runs on its own (no CTA barrier per
// block): a private 3-stage cp.async pipeline of 16-byte loads (K and V rows of its block, addresses
// from the page table looked up one block ahead), S = Q K^T and O += P V with mma.sync, and an online
// softmax on the accumulator fragments. At the end the four warps' (max, sum, O) are merged through
// shared memory in a fixed order, and the CTA writes the output + lse (one split) or fp32 partials.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4): A (16x16) rows g / g+8, columns
// 2t, 2t+1 (+8); B (16x8) rows 2t, 2t+1 (+8), column g; C (16x8) rows g / g+8, columns 2t, 2t+1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cutlass/arch/memory_sm80.h>

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

__device__ __forceinline__ SeqView seq_view(const DecodeArgs& a, int b) {
  SeqView s;
  const int sk_cache = a.cache_seqlens ? min(max(a.cache_seqlens[b], 0), a.capacity - a.seqlen_new) : a.capacity;
  s.leftpad = a.cache_leftpad ? min(max(a.cache_leftpad[b], 0), sk_cache) : 0;
  s.sk = sk_cache + a.seqlen_new - s.leftpad;
  s.q_start = a.cu_seqlens_q ? a.cu_seqlens_q[b] : 0;
  s.sq = a.cu_seqlens_q ? a.cu_seqlens_q[b + 1] - a.cu_seqlens_q[b] : a.seqlen_q;
  s.cache_row = a.cache_batch_idx ? a.cache_batch_idx[b] : b;
  return s;
}

// (page or cache row, row inside it) of effective key j; page -1 when the key does not exist or its
// index is out of range.
__device__ __forceinline__ int2 key_location(const DecodeArgs& a, const SeqView& s, int b, int j) {
  if (j >= s.sk) return {-1, 0};
  const int pos = s.leftpad + j;
  if (a.block_table == nullptr) {
    const bool ok = s.cache_row >= 0 && s.cache_row < a.cache_batch && pos < a.capacity;
    return {ok ? s.cache_row : -1, pos};
  }
  const int blk = pos / a.page_size;
  const int page = blk < a.max_blocks ? a.block_table[b * a.block_table_stride + blk] : -1;
  return {(page >= 0 && page < a.cache_batch) ? page : -1, pos - blk * a.page_size};
}

// ----------------------------------------------------------------------------------------------------
// The kernel
// ----------------------------------------------------------------------------------------------------

template <int kHeadDim>
struct Traits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = kDecodeRows;
  static constexpr int kBlock = kDecodeKeys / kWarps;        // keys per warp step
  static constexpr int kStages = kHeadDim <= 128 ? 3 : 2;   // per warp
  static constexpr int kChunks = kHeadDim / 8;              // 16-byte chunks per row
  static constexpr int kRowElems = kHeadDim + 8;            // +16 bytes: ldmatrix rows hit distinct banks
  static constexpr int kStageElems = 2 * kBlock * kRowElems;  // K then V
  static constexpr int kKVBytes = kWarps * kStages * kStageElems * 2;
  static constexpr int kQBytes = kRows * kRowElems * 2;
  static constexpr int kMergeBytes = kWarps * kRows * kHeadDim * 4;  // reuses the K/V buffers
  static constexpr int kSmemBytes = kKVBytes + kQBytes + 2 * kWarps * kRows * 4 + 2 * kRows * 4;
  static_assert(kMergeBytes <= kKVBytes, "merge buffer must fit in the K/V buffers");
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
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

template <typename T>
__device__ __forceinline__ void ldsm_x4(const T* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}
template <typename T>
__device__ __forceinline__ void ldsm_x4_trans(const T* smem, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2], r[3]);
}

template <typename Element>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOp<Element>::type::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(Traits<kHeadDim>::kThreads)
decode_kernel(const DecodeArgs a) {
  using T = Traits<kHeadDim>;
  constexpr int kRows = T::kRows;
  extern __shared__ __align__(16) char smem[];
  Element* kv_s = reinterpret_cast<Element*>(smem);                       // [warp][stage][K|V][16][kRowElems]
  Element* q_s = reinterpret_cast<Element*>(smem + T::kKVBytes);           // [16][kRowElems]
  float* wm_s = reinterpret_cast<float*>(smem + T::kKVBytes + T::kQBytes);  // [warp][16] running max (log2)
  float* wl_s = wm_s + T::kWarps * kRows;                                  // [warp][16] row sums
  float* m_s = wl_s + T::kWarps * kRows;                                   // [16] merged max
  float* l_s = m_s + kRows;                                                // [16] merged sum

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t4 = lane % 4;
  const int hk = blockIdx.x % a.heads_k, row_tile = blockIdx.x / a.heads_k;
  const int split = blockIdx.y, b = blockIdx.z;
  const int group = a.heads / a.heads_k;
  const SeqView s = seq_view(a, b);
  const int row0 = row_tile * kRows;
  const int rows = min(kRows, s.sq * group - row0);
  if (rows <= 0) return;

  // Key blocks of this CTA: the visible range of its rows, cut into num_splits runs.
  const int offset = s.sk - s.sq;
  const int i_first = row0 / group, i_last = (row0 + rows - 1) / group;
  const int n_lo = a.window_left >= 0 ? max(0, i_first + offset - a.window_left) : 0;
  const int n_hi = a.window_right >= 0 ? min(s.sk, i_last + offset + a.window_right + 1) : s.sk;
  const int k_lo = n_lo / T::kBlock;
  const int k_hi = n_hi > n_lo ? (n_hi + T::kBlock - 1) / T::kBlock : k_lo;
  const int per_split = (k_hi - k_lo + a.num_splits - 1) / a.num_splits;
  const int k_begin = min(k_hi, k_lo + split * per_split), k_end = min(k_hi, k_begin + per_split);
  const int my_blocks = k_end - k_begin > warp ? (k_end - k_begin - warp + T::kWarps - 1) / T::kWarps : 0;

  // Q tile (16 rows, bf16 / fp16) in shared memory; rows past `rows` and dims past head_dim are zero.
  const Element* q = static_cast<const Element*>(a.q);
  for (int c = tid; c < kRows * T::kChunks; c += T::kThreads) {
    const int r = c / T::kChunks, ch = c % T::kChunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows && ch * 8 < a.head_dim) {
      const int i = (row0 + r) / group, h = hk * group + (row0 + r) % group;
      const int64_t qrow = a.cu_seqlens_q ? (s.q_start + i) * a.q_row : b * a.q_batch + i * a.q_row;
      const Element* src = q + qrow + h * a.q_head + ch * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) reinterpret_cast<Element*>(&v)[e] = src[e];
    }
    *reinterpret_cast<uint4*>(q_s + r * T::kRowElems + ch * 8) = v;
  }

  // This thread's two accumulator rows: g and g + 8.
  int row_i[2], diag[2];
  float slope[2];
  bool row_ok[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = g + 8 * hr;
    row_ok[hr] = r < rows;
    row_i[hr] = (row0 + r) / group;
    diag[hr] = row_i[hr] + offset;
    const int h = hk * group + (row0 + r) % group;
    slope[hr] = (a.alibi && row_ok[hr]) ? a.alibi[b * a.alibi_batch_stride + h] * kLog2e : 0.f;
  }

  // Per-warp pipeline over blocks k_begin + warp + 4 n.
  Element* my_kv = kv_s + warp * T::kStages * T::kStageElems;
  const Element* kg = static_cast<const Element*>(a.k) + hk * a.k_head;
  const Element* vg = static_cast<const Element*>(a.v) + hk * a.v_head;
  auto block_key0 = [&](int n) { return (k_begin + warp + n * T::kWarps) * T::kBlock; };
  auto locate = [&](int n) { return key_location(a, s, b, block_key0(n) + lane % T::kBlock); };
  auto issue = [&](int stage, int2 loc) {  // lane l holds the location of row l % 16
    Element* ks = my_kv + stage * T::kStageElems;
    Element* vs = ks + T::kBlock * T::kRowElems;
#pragma unroll
    for (int c = lane; c < T::kBlock * T::kChunks; c += 32) {
      const int row = c / T::kChunks, ch = c % T::kChunks;
      const int page = __shfl_sync(0xffffffffu, loc.x, row), prow = __shfl_sync(0xffffffffu, loc.y, row);
      const bool ok = page >= 0 && ch * 8 < a.head_dim;
      const Element* ksrc = ok ? kg + page * a.k_batch + prow * a.k_row + ch * 8 : kg;
      const Element* vsrc = ok ? vg + page * a.v_batch + prow * a.v_row + ch * 8 : vg;
      cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(ks + row * T::kRowElems + ch * 8, ksrc, ok);
      cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(vs + row * T::kRowElems + ch * 8, vsrc, ok);
    }
  };

#pragma unroll
  for (int st = 0; st < T::kStages - 1; ++st) {
    if (st < my_blocks) issue(st, locate(st));
    cutlass::arch::cp_async_fence();
  }
  int2 next_loc = T::kStages - 1 < my_blocks ? locate(T::kStages - 1) : int2{-1, 0};
  __syncthreads();  // q_s

  float acc[kHeadDim / 8][4];
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  // ldmatrix row addresses: lane -> (matrix lane / 8, row lane % 8).
  const int lm = lane / 8, lr = lane % 8;
  const Element* q_frag = q_s + (lr + 8 * (lm % 2)) * T::kRowElems + 8 * (lm / 2);

  for (int n = 0; n < my_blocks; ++n) {
    __syncwarp();  // every lane is done with the stage refilled below
    const int fill = n + T::kStages - 1;
    if (fill < my_blocks) issue(fill % T::kStages, next_loc);
    cutlass::arch::cp_async_fence();
    if (fill + 1 < my_blocks) next_loc = locate(fill + 1);
    cutlass::arch::cp_async_wait<T::kStages - 1>();
    __syncwarp();
    const Element* ks = my_kv + (n % T::kStages) * T::kStageElems;
    const Element* vs = ks + T::kBlock * T::kRowElems;

    // S = Q K^T: 16 rows x 16 keys (two n-tiles of 8 keys).
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const Element* k_frag = ks + (lr + 8 * (lm / 2)) * T::kRowElems + 8 * (lm % 2);
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t qa[4], kb[4];
      ldsm_x4(q_frag + kk * 16, qa);
      ldsm_x4(k_frag + kk * 16, kb);
      mma<Element>(sc[0], qa, kb[0], kb[1]);
      mma<Element>(sc[1], qa, kb[2], kb[3]);
    }

    // Scale, softcap, ALiBi, mask (log2 domain); online softmax per row (a quad holds a row's 16 keys).
    const int key0 = block_key0(n);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = key0 + 8 * nt + 2 * t4 + e;
          const bool visible = row_ok[hr] && j < s.sk && (a.window_right < 0 || j <= diag[hr] + a.window_right) &&
                               (a.window_left < 0 || j >= diag[hr] - a.window_left);
          float x = sc[nt][2 * hr + e] * a.scale;
          if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
          x = x * kLog2e - slope[hr] * fabsf(float(diag[hr] - j));
          sc[nt][2 * hr + e] = visible ? x : -INFINITY;
          mx = fmaxf(mx, sc[nt][2 * hr + e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[hr], mx);
      const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_run[hr] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[nt][2 * hr + e];
          x = x == -INFINITY ? 0.f : exp2f(x - m_new);
          sum += x;
        }
      }
      l_run[hr] = l_run[hr] * alpha + sum;
      m_run[hr] = m_new;
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 8; ++nt) {
        acc[nt][2 * hr] *= alpha;
        acc[nt][2 * hr + 1] *= alpha;
      }
    }

    // O += P V: P (16 x 16 keys) is the A operand straight from the S fragments.
    const uint32_t pa[4] = {pack2(sc[0][0], sc[0][1], Element()), pack2(sc[0][2], sc[0][3], Element()),
                            pack2(sc[1][0], sc[1][1], Element()), pack2(sc[1][2], sc[1][3], Element())};
    const Element* v_frag = vs + (lr + 8 * (lm % 2)) * T::kRowElems + 8 * (lm / 2);
#pragma unroll
    for (int np = 0; np < kHeadDim / 16; ++np) {
      uint32_t vb[4];
      ldsm_x4_trans(v_frag + np * 16, vb);
      mma<Element>(acc[2 * np], pa, vb[0], vb[1]);
      mma<Element>(acc[2 * np + 1], pa, vb[2], vb[3]);
    }
  }
  cutlass::arch::cp_async_wait<0>();

  // Merge the warps: row max and sum, then the rescaled accumulators summed in warp order.
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 1);
    l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 2);
    if (t4 == 0) {
      wm_s[warp * kRows + g + 8 * hr] = m_run[hr];
      wl_s[warp * kRows + g + 8 * hr] = l_run[hr];
    }
  }
  __syncthreads();  // also: every warp is done with its K/V buffers, reused below
  if (tid < kRows) {
    float m = -INFINITY, l = 0.f;
#pragma unroll
    for (int w = 0; w < T::kWarps; ++w) m = fmaxf(m, wm_s[w * kRows + tid]);
#pragma unroll
    for (int w = 0; w < T::kWarps; ++w) {
      const float mw = wm_s[w * kRows + tid];
      l += mw == -INFINITY ? 0.f : wl_s[w * kRows + tid] * exp2f(mw - m);
    }
    m_s[tid] = m;
    l_s[tid] = l;
  }
  __syncthreads();
  float* merge = reinterpret_cast<float*>(smem);  // [warp][16][kHeadDim]
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = g + 8 * hr;
    const float scale = m_run[hr] == -INFINITY ? 0.f : exp2f(m_run[hr] - m_s[r]);
    float* dst = merge + (warp * kRows + r) * kHeadDim + 2 * t4;
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) {
      *reinterpret_cast<float2*>(dst + 8 * nt) = make_float2(acc[nt][2 * hr] * scale, acc[nt][2 * hr + 1] * scale);
    }
  }
  __syncthreads();

  const bool final = a.num_splits == 1;
  for (int idx = tid; idx < rows * a.head_dim; idx += T::kThreads) {
    const int r = idx / a.head_dim, d = idx % a.head_dim;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < T::kWarps; ++w) o += merge[(w * kRows + r) * kHeadDim + d];
    const float l = l_s[r];
    o = l > 0.f ? o / l : 0.f;
    const int i = (row0 + r) / group, h = hk * group + (row0 + r) % group;
    const int64_t row_g = a.cu_seqlens_q ? s.q_start + i : int64_t(b) * a.seqlen_q + i;
    if (final) {
      const int64_t at = a.cu_seqlens_q ? row_g * a.out_row : b * a.out_batch + i * a.out_row;
      store_float(static_cast<Element*>(a.out) + at + h * a.out_head + d, o);
    } else {
      a.out_accum[((split * a.total_rows + row_g) * a.heads + h) * a.head_dim + d] = o;
    }
  }
  if (tid < rows) {
    const int i = (row0 + tid) / group, h = hk * group + (row0 + tid) % group;
    const int64_t row_g = a.cu_seqlens_q ? s.q_start + i : int64_t(b) * a.seqlen_q + i;
    const float l = l_s[tid];
    const float lse = l > 0.f ? m_s[tid] * kLn2 + logf(l) : (final ? INFINITY : -INFINITY);
    if (final) {
      a.lse[a.cu_seqlens_q ? int64_t(h) * a.total_rows + row_g : (int64_t(b) * a.heads + h) * a.seqlen_q + i] = lse;
    } else {
      a.lse_accum[(split * a.total_rows + row_g) * a.heads + h] = lse;
    }
  }
}

template <int kHeadDim, typename Element>
Status launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  using T = Traits<kHeadDim>;
  auto kernel = decode_kernel<kHeadDim, Element>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return Status::CudaError(std::string("decode kernel setup: ") + cudaGetErrorString(err));
  const dim3 grid(row_tiles(a) * a.heads_k, a.num_splits, a.batch);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return Status::CudaError(std::string("decode kernel launch: ") + cudaGetErrorString(err));
  return Status::Ok();
}

template <int kHeadDim, typename Element>
Status run_decode(const DecodeArgs& a, cudaStream_t stream) {
  return launch_decode<kHeadDim, Element>(a, stream);
}

}  // namespace flash_attention::cuda::decode
