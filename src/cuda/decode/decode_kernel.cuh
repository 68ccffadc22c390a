// Split-KV attention over a (paged) KV cache: the memory-bound decode kernel.
//
// One CTA (128 threads) = (tile of kRows packed query rows of one KV head, split, batch). Per key tile:
//   1. K and V rows stream into shared memory with 16-byte cp.async, two stages deep; the row addresses
//      (page lookup) are computed once per key by one thread and kept in shared memory.
//   2. q k^T: 2 (4 for head dims > 128) adjacent threads share a key, each summing alternate 16-byte
//      chunks for every packed row (q is fp32 in shared memory, read as broadcasts); a shuffle adds the
//      parts; then softcap / ALiBi / the mask.
//   3. Online softmax: row maxima through warp shuffles + shared memory; every thread keeps the same
//      running max m and its own partial row sums.
//   4. P V: thread (group, chunk) accumulates 8 output dims over the keys of its group.
// The epilogue reduces the partial sums and accumulators through shared memory and writes either the
// final output + lse (one split) or fp32 partials for the combine kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cutlass/arch/memory_sm80.h>

#include "cuda/decode/decode_args.h"

namespace flash_attention::cuda::decode {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDim, int kRows>
struct Traits {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;  // keys per tile
  static constexpr int kThreadsPerKey = kThreads / kBlockN;   // q k^T: 2 or 4 threads share one key
  static constexpr int kChunks = kHeadDim / 8;                // 16-byte chunks per head row
  static constexpr int kGroups = kThreads / kChunks;          // P V: key groups x chunks
  static constexpr int kKeysPerGroup = (kBlockN + kGroups - 1) / kGroups;
  static constexpr int kStages = 2;
  // Row padding so that the threads of a quarter warp hit distinct banks: 32 bytes (2 threads per key,
  // who read alternate chunks) or 64 bytes (4 threads per key).
  static constexpr int kRowElems = kHeadDim + (kThreadsPerKey == 2 ? 16 : 32);
  static_assert(kRows % 4 == 0 && kGroups >= 1 && kChunks % kThreadsPerKey == 0, "bad decode tile");

  static constexpr int kKVBytes = kStages * 2 * kBlockN * kRowElems * 2;
  static constexpr int kFloats = kRows * kHeadDim * 2 + kBlockN * kRows + kWarps * kRows + kRows;
  static constexpr int kRowInfoBytes = kStages * kBlockN * 8;
  static constexpr int kSmemBytes = kKVBytes + kFloats * 4 + kRowInfoBytes;
};

// ----------------------------------------------------------------------------------------------------
// Small device helpers
// ----------------------------------------------------------------------------------------------------

__device__ __forceinline__ void to_float8(const uint4& raw, float* f, __nv_bfloat16) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void to_float8(const uint4& raw, float* f, __half) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

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

template <int kHeadDim, int kRows, typename Element>
__global__ void __launch_bounds__(Traits<kHeadDim, kRows>::kThreads)
decode_kernel(const DecodeArgs a) {
  using T = Traits<kHeadDim, kRows>;
  extern __shared__ __align__(16) char smem[];
  Element* kv_s = reinterpret_cast<Element*>(smem);                  // [stage][k|v][kBlockN][kRowElems]
  float* q_s = reinterpret_cast<float*>(smem + T::kKVBytes);          // [kRows][kHeadDim], scaled
  float* o_s = q_s + kRows * kHeadDim;                                // [kRows][kHeadDim]
  float* p_s = o_s + kRows * kHeadDim;                                // [kBlockN][kRows]
  float* red_s = p_s + T::kBlockN * kRows;                            // [kWarps][kRows]
  float* lsum_s = red_s + T::kWarps * kRows;                          // [kRows]
  int2* loc_s = reinterpret_cast<int2*>(lsum_s + kRows);              // [stage][kBlockN]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int hk = blockIdx.x % a.heads_k, row_tile = blockIdx.x / a.heads_k;
  const int split = blockIdx.y, b = blockIdx.z;
  const int group = a.heads / a.heads_k;
  const SeqView s = seq_view(a, b);
  const int row0 = row_tile * kRows;
  const int rows = min(kRows, s.sq * group - row0);
  if (rows <= 0) return;  // a short varlen sequence: these rows do not exist

  // Key tiles this CTA visits: the visible range of its rows, cut into num_splits runs.
  const int offset = s.sk - s.sq;
  const int i_first = row0 / group, i_last = (row0 + rows - 1) / group;
  const int n_lo = a.window_left >= 0 ? max(0, i_first + offset - a.window_left) : 0;
  const int n_hi = a.window_right >= 0 ? min(s.sk, i_last + offset + a.window_right + 1) : s.sk;
  const int t_lo = n_lo / T::kBlockN;
  const int t_hi = n_hi > n_lo ? (n_hi + T::kBlockN - 1) / T::kBlockN : t_lo;
  const int per_split = (t_hi - t_lo + a.num_splits - 1) / a.num_splits;
  const int t_begin = min(t_hi, t_lo + split * per_split), t_end = min(t_hi, t_begin + per_split);
  const int num_tiles = t_end - t_begin;

  // Rows: query index, head, ALiBi slope.
  int row_i[kRows], row_h[kRows];
  float slope[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_i[r] = (row0 + r) / group;
    row_h[r] = hk * group + (row0 + r) % group;
    slope[r] = (a.alibi && r < rows) ? a.alibi[b * a.alibi_batch_stride + row_h[r]] * kLog2e : 0.f;
  }

  const Element* q = static_cast<const Element*>(a.q);
  for (int idx = tid; idx < kRows * kHeadDim; idx += T::kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim;
    float x = 0.f;
    if (r < rows && d < a.head_dim) {
      const int64_t qrow = a.cu_seqlens_q ? (s.q_start + row_i[r]) * a.q_row : b * a.q_batch + row_i[r] * a.q_row;
      x = load_float(q + qrow + row_h[r] * a.q_head + d) * a.scale;
    }
    q_s[idx] = x;
    o_s[idx] = 0.f;
  }

  const Element* kg = static_cast<const Element*>(a.k) + hk * a.k_head;
  const Element* vg = static_cast<const Element*>(a.v) + hk * a.v_head;
  auto locate = [&](int tile, int stage) {
    if (tid < T::kBlockN) loc_s[stage * T::kBlockN + tid] = key_location(a, s, b, tile * T::kBlockN + tid);
  };
  auto issue_loads = [&](int stage) {
    Element* ks = kv_s + stage * 2 * T::kBlockN * T::kRowElems;
    Element* vs = ks + T::kBlockN * T::kRowElems;
#pragma unroll 4
    for (int c = tid; c < T::kBlockN * T::kChunks; c += T::kThreads) {
      const int row = c / T::kChunks, ch = c % T::kChunks;
      const int2 loc = loc_s[stage * T::kBlockN + row];
      const bool ok = loc.x >= 0 && ch * 8 < a.head_dim;
      const Element* ksrc = ok ? kg + loc.x * a.k_batch + loc.y * a.k_row + ch * 8 : kg;
      const Element* vsrc = ok ? vg + loc.x * a.v_batch + loc.y * a.v_row + ch * 8 : vg;
      cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(ks + row * T::kRowElems + ch * 8, ksrc, ok);
      cutlass::arch::cp_async_zfill<16, cutlass::arch::CacheOperation::Global>(vs + row * T::kRowElems + ch * 8, vsrc, ok);
    }
  };

  // Prologue: locate and start loading the first kStages tiles.
#pragma unroll
  for (int st = 0; st < T::kStages; ++st) {
    if (st < num_tiles) locate(t_begin + st, st);
  }
  __syncthreads();
#pragma unroll
  for (int st = 0; st < T::kStages; ++st) {
    if (st < num_tiles) issue_loads(st);
    cutlass::arch::cp_async_fence();
  }

  float m_run[kRows], l_part[kRows], acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -INFINITY;
    l_part[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }
  const int qk_key = tid / T::kThreadsPerKey, qk_part = tid % T::kThreadsPerKey;
  const int pv_group = tid / T::kChunks, pv_chunk = tid % T::kChunks;
  const bool pv_active = pv_group < T::kGroups;

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t % T::kStages;
    cutlass::arch::cp_async_wait<T::kStages - 1>();
    __syncthreads();
    if (t + T::kStages < num_tiles) locate(t_begin + t + T::kStages, stage);  // used after the syncs below
    const Element* ks = kv_s + stage * 2 * T::kBlockN * T::kRowElems;
    const Element* vs = ks + T::kBlockN * T::kRowElems;

    // q k^T for key `key` of this tile: this thread sums chunks part, part + kThreadsPerKey, ...
    float sc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) sc[r] = 0.f;
#pragma unroll
    for (int c = 0; c < T::kChunks / T::kThreadsPerKey; ++c) {
      const int ch = c * T::kThreadsPerKey + qk_part;
      float kf[8];
      to_float8(*reinterpret_cast<const uint4*>(ks + qk_key * T::kRowElems + ch * 8), kf, Element());
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float4 q0 = *reinterpret_cast<const float4*>(q_s + r * kHeadDim + ch * 8);
        const float4 q1 = *reinterpret_cast<const float4*>(q_s + r * kHeadDim + ch * 8 + 4);
        sc[r] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] + q1.y * kf[5] +
                 q1.z * kf[6] + q1.w * kf[7];
      }
    }
    // Sum the parts, transform and mask (log2 domain), then the tile's row maxima.
    const int j = (t_begin + t) * T::kBlockN + qk_key;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int o = 1; o < T::kThreadsPerKey; o <<= 1) sc[r] += __shfl_xor_sync(0xffffffffu, sc[r], o);
      const int diag = row_i[r] + offset;
      const bool visible = r < rows && j < s.sk && (a.window_right < 0 || j <= diag + a.window_right) &&
                           (a.window_left < 0 || j >= diag - a.window_left);
      float x = sc[r];
      if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
      x = x * kLog2e - slope[r] * fabsf(float(diag - j));
      sc[r] = visible ? x : -INFINITY;
      const float m = warp_max(sc[r]);
      if (lane == 0) red_s[warp * kRows + r] = m;
    }
    __syncthreads();

    // Online softmax: new running max, rescale factors, probabilities into p_s.
    float alpha[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float m_new = m_run[r];
#pragma unroll
      for (int w = 0; w < T::kWarps; ++w) m_new = fmaxf(m_new, red_s[w * kRows + r]);
      alpha[r] = m_new == -INFINITY ? 1.f : exp2f(m_run[r] - m_new);
      const float p = sc[r] == -INFINITY ? 0.f : exp2f(sc[r] - m_new);
      l_part[r] = l_part[r] * alpha[r] + (qk_part == 0 ? p : 0.f);
      m_run[r] = m_new;
      sc[r] = p;
    }
#pragma unroll
    for (int r = 0; r < kRows; r += 4) {
      if (qk_part == 0) *reinterpret_cast<float4*>(p_s + qk_key * kRows + r) = make_float4(sc[r], sc[r + 1], sc[r + 2], sc[r + 3]);
    }
    __syncthreads();

    // P V for this thread's 8 output dims over its key group.
    if (pv_active) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] *= alpha[r];
      }
#pragma unroll 2
      for (int kk = 0; kk < T::kKeysPerGroup; ++kk) {
        const int key = pv_group + kk * T::kGroups;
        if (T::kBlockN % T::kGroups != 0 && key >= T::kBlockN) break;
        float vf[8];
        to_float8(*reinterpret_cast<const uint4*>(vs + key * T::kRowElems + pv_chunk * 8), vf, Element());
#pragma unroll
        for (int r = 0; r < kRows; r += 4) {
          const float4 p = *reinterpret_cast<const float4*>(p_s + key * kRows + r);
          const float pr[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
          for (int rr = 0; rr < 4; ++rr) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r + rr][e] += pr[rr] * vf[e];
          }
        }
      }
    }
    __syncthreads();
    if (t + T::kStages < num_tiles) issue_loads(stage);
    cutlass::arch::cp_async_fence();
  }
  cutlass::arch::cp_async_wait<0>();

  // Epilogue: reduce row sums and accumulators across threads, in a fixed order (deterministic).
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float l = warp_sum(l_part[r]);
    if (lane == 0) red_s[warp * kRows + r] = l;
  }
  for (int g = 0; g < T::kGroups; ++g) {
    if (pv_active && pv_group == g) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) o_s[r * kHeadDim + pv_chunk * 8 + e] += acc[r][e];
      }
    }
    __syncthreads();
  }
  if (tid < kRows) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < T::kWarps; ++w) l += red_s[w * kRows + tid];
    lsum_s[tid] = l;
  }
  __syncthreads();

  const bool final = a.num_splits == 1;
  for (int idx = tid; idx < kRows * a.head_dim; idx += T::kThreads) {
    const int r = idx / a.head_dim, d = idx % a.head_dim;
    if (r >= rows) break;
    const float l = lsum_s[r];
    const float o = l > 0.f ? o_s[r * kHeadDim + d] / l : 0.f;
    const int64_t row_g = a.cu_seqlens_q ? s.q_start + row_i[r] : int64_t(b) * a.seqlen_q + row_i[r];
    if (final) {
      const int64_t at = a.cu_seqlens_q ? row_g * a.out_row : b * a.out_batch + row_i[r] * a.out_row;
      store_float(static_cast<Element*>(a.out) + at + row_h[r] * a.out_head + d, o);
    } else {
      a.out_accum[((split * a.total_rows + row_g) * a.heads + row_h[r]) * a.head_dim + d] = o;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (tid != 0 || r >= rows) continue;
    const float l = lsum_s[r];
    const int64_t row_g = a.cu_seqlens_q ? s.q_start + row_i[r] : int64_t(b) * a.seqlen_q + row_i[r];
    if (final) {
      const float lse = l > 0.f ? m_run[r] * kLn2 + logf(l) : INFINITY;
      const int64_t at = a.cu_seqlens_q ? int64_t(row_h[r]) * a.total_rows + row_g
                                        : (int64_t(b) * a.heads + row_h[r]) * a.seqlen_q + row_i[r];
      a.lse[at] = lse;
    } else {
      a.lse_accum[(split * a.total_rows + row_g) * a.heads + row_h[r]] = l > 0.f ? m_run[r] * kLn2 + logf(l) : -INFINITY;
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// Launch
// ----------------------------------------------------------------------------------------------------

template <int kHeadDim, int kRows, typename Element>
Status launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  using T = Traits<kHeadDim, kRows>;
  auto kernel = decode_kernel<kHeadDim, kRows, Element>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return Status::CudaError(std::string("decode kernel setup: ") + cudaGetErrorString(err));
  const dim3 grid(row_tiles(a, kRows) * a.heads_k, a.num_splits, a.batch);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return Status::CudaError(std::string("decode kernel launch: ") + cudaGetErrorString(err));
  return Status::Ok();
}

template <int kHeadDim, typename Element>
Status run_decode(const DecodeArgs& a, cudaStream_t stream) {
  if (rows_per_tile(a.seqlen_q * (a.heads / a.heads_k)) == 4) return launch_decode<kHeadDim, 4, Element>(a, stream);
  return launch_decode<kHeadDim, 8, Element>(a, stream);
}

}  // namespace flash_attention::cuda::decode
