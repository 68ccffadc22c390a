// CUDA side of the KV-cache path: host-side index checks, the append + rotary kernels, the launch plan
// and dispatch of the split-KV attention kernel (src/cuda/decode/decode_kernel.cuh, which merges its
// splits itself), and the combine kernel of flash_attn_combine.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/kvcache_cpu.h"
#include "cpu/kvcache_rotary.h"
#include "cuda/decode/decode_api.h"
#include "cuda/decode/decode_args.h"

namespace flash_attention::cuda {

namespace {

using decode::DecodeArgs;

constexpr int kBuiltHeadDims[] = {FA_HEADDIMS_BUILT};
constexpr bool head_dim_built(int d) {
  for (int built : kBuiltHeadDims) {
    if (built == d) return true;
  }
  return false;
}

Status cuda_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::CudaError(std::string(what) + ": " + cudaGetErrorString(err));
}

// ----------------------------------------------------------------------------------------------------
// Element access and the per-row copy with rotary (one warp per head row)
// ----------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename E> __device__ __forceinline__ E from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }

struct Rotary {
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t cos_stride = 0, sin_stride = 0;
  int dim = 0;  // 0: plain copy
  int rows = 0;
  bool interleaved = true;
};

Rotary rotary_of(const KVCacheParams& p) {
  if (!p.has_rotary()) return {};
  return {p.rotary_cos, p.rotary_sin, p.rotary_cos_stride, p.rotary_sin_stride, p.rotary_dim, p.seqlen_rotary,
          p.rotary_interleaved};
}

template <typename E>
__device__ void copy_row_rotated(const E* src, E* dst, int head_dim, const Rotary& ro, int pos, int lane) {
  const int half = ro.dim / 2;
  pos = min(max(pos, 0), max(ro.rows - 1, 0));  // memory safety only: positions are checked on the host
  const E* cos = static_cast<const E*>(ro.cos) + pos * ro.cos_stride;
  const E* sin = static_cast<const E*>(ro.sin) + pos * ro.sin_stride;
  for (int item = lane; item < half + head_dim - ro.dim; item += 32) {
    if (item < half) {
      const int i0 = kv::rotary_first(item, ro.dim, ro.interleaved);
      const int i1 = kv::rotary_second(item, ro.dim, ro.interleaved);
      float x0 = to_f(src[i0]), x1 = to_f(src[i1]);
      kv::rotate_pair(x0, x1, to_f(cos[item]), to_f(sin[item]));
      dst[i0] = from_f<E>(x0);
      dst[i1] = from_f<E>(x1);
    } else {
      const int d = ro.dim + item - half;
      dst[d] = src[d];
    }
  }
}

__device__ __forceinline__ int clamped_seqlen(const KVCacheParams& p, int b) {
  const int capacity = p.block_table ? p.max_blocks_per_seq * p.cache_seqlen : p.cache_seqlen;
  return p.cache_seqlens ? min(max(p.cache_seqlens[b], 0), capacity - p.seqlen_new) : capacity;
}

// k_new / v_new row (b, s, h) -> cache position cache_seqlens[b] + s (k rotated). grid (ceil(Sn * Hk / 4), B).
template <typename E>
__global__ void append_kernel(const KVCacheParams p, const Rotary ro) {
  const int lane = threadIdx.x % 32, w = blockIdx.x * 4 + threadIdx.x / 32, b = blockIdx.y;
  const int s = w / p.num_heads_k, h = w % p.num_heads_k;
  if (s >= p.seqlen_new) return;
  const int pos = clamped_seqlen(p, b) + s;
  int64_t page, row;
  if (p.block_table) {
    page = p.block_table[b * p.block_table_stride + pos / p.cache_seqlen];
    row = pos % p.cache_seqlen;
  } else {
    page = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
    row = pos;
  }
  if (page < 0 || page >= p.cache_batch) return;  // unchecked bad index: skip, never write out of bounds
  const TensorStrides &kn = p.k_new_strides, &vn = p.v_new_strides, &kc = p.k_cache_strides, &vc = p.v_cache_strides;
  copy_row_rotated(static_cast<const E*>(p.k_new) + b * kn.batch + s * kn.row + h * kn.head,
                   static_cast<E*>(p.k_cache) + page * kc.batch + row * kc.row + h * kc.head, p.head_dim, ro, pos, lane);
  copy_row_rotated(static_cast<const E*>(p.v_new) + b * vn.batch + s * vn.row + h * vn.head,
                   static_cast<E*>(p.v_cache) + page * vc.batch + row * vc.row + h * vc.head, p.head_dim, Rotary{}, pos,
                   lane);
}

// q row (b, i, h) -> q_rot (total_rows, H, D), rotated at its position. grid (ceil(Sq * H / 4), B).
template <typename E>
__global__ void rotate_q_kernel(const KVCacheParams p, const Rotary ro, E* q_rot, bool per_row) {
  const int lane = threadIdx.x % 32, w = blockIdx.x * 4 + threadIdx.x / 32, b = blockIdx.y;
  const int i = w / p.num_heads, h = w % p.num_heads;
  const int64_t q_start = p.cu_seqlens_q ? p.cu_seqlens_q[b] : 0;
  const int sq = p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : p.seqlen_q;
  if (i >= sq) return;
  const int64_t src_row = p.cu_seqlens_q ? (q_start + i) * p.q_strides.row : b * p.q_strides.batch + i * p.q_strides.row;
  const int64_t dst_row = p.cu_seqlens_q ? q_start + i : int64_t(b) * p.seqlen_q + i;
  copy_row_rotated(static_cast<const E*>(p.q) + src_row + h * p.q_strides.head,
                   q_rot + (dst_row * p.num_heads + h) * p.head_dim, p.head_dim, ro,
                   clamped_seqlen(p, b) + (per_row ? i : 0), lane);
}

// ----------------------------------------------------------------------------------------------------
// Combine (flash_attn_combine): one warp per output row (b, i, h); split s's weight is computed once
// per lane and the lanes hold head dims lane, lane + 32, ...
// ----------------------------------------------------------------------------------------------------

constexpr int kCombineDimsPerLane = 8;  // head_dim <= 256

__device__ __forceinline__ float warp_reduce_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_reduce_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename E>
__global__ void combine_kernel(const CombineParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  if (n >= int64_t(p.batch) * p.seqlen * p.num_heads) return;
  const int h = n % p.num_heads, i = (n / p.num_heads) % p.seqlen, b = n / (int64_t(p.num_heads) * p.seqlen);
  const float* lse = p.lse_partial + b * p.lse_batch_stride + i * p.lse_row_stride + h * p.lse_head_stride;
  float mx = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) mx = fmaxf(mx, lse[s * p.lse_split_stride]);
  mx = warp_reduce_max(mx);
  float sum = 0.f;
  for (int s = lane; s < p.num_splits; s += 32) sum += mx == -INFINITY ? 0.f : __expf(lse[s * p.lse_split_stride] - mx);
  sum = warp_reduce_sum(sum);
  const TensorStrides& os = p.out_partial_strides;
  const float* part = p.out_partial + b * os.batch + i * os.row + h * os.head;
  float acc[kCombineDimsPerLane] = {};
  for (int s = 0; s < p.num_splits && mx != -INFINITY; ++s) {
    const float w = __expf(lse[s * p.lse_split_stride] - mx);  // 0 for a part with lse = -inf
#pragma unroll
    for (int k = 0; k < kCombineDimsPerLane; ++k) {
      const int d = lane + 32 * k;
      if (d < p.head_dim) acc[k] += w * part[s * p.out_partial_split_stride + d];
    }
  }
  E* out = static_cast<E*>(p.out) + b * p.out_strides.batch + i * p.out_strides.row + h * p.out_strides.head;
#pragma unroll
  for (int k = 0; k < kCombineDimsPerLane; ++k) {
    const int d = lane + 32 * k;
    if (d < p.head_dim) out[d] = from_f<E>(mx == -INFINITY ? 0.f : acc[k] / sum);
  }
  if (lane == 0 && p.softmax_lse) {
    p.softmax_lse[(int64_t(b) * p.num_heads + h) * p.seqlen + i] = mx == -INFINITY ? INFINITY : mx + __logf(sum);
  }
}

Status launch_combine(const CombineParams& p) {
  const int64_t rows = int64_t(p.batch) * p.seqlen * p.num_heads;
  const dim3 grid(static_cast<unsigned>((rows + 3) / 4));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  switch (p.out_dtype) {
    case DType::kFloat16: combine_kernel<__half><<<grid, 128, 0, stream>>>(p); break;
    case DType::kBFloat16: combine_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(p); break;
    default: combine_kernel<float><<<grid, 128, 0, stream>>>(p);
  }
  return cuda_error(cudaGetLastError(), "combine kernel launch");
}

// ----------------------------------------------------------------------------------------------------
// Host side: checks, split heuristic, workspace, dispatch
// ----------------------------------------------------------------------------------------------------

Status check_alignment(const void* ptr, const TensorStrides& s, const char* name) {
  const bool ok = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0;
  if (ok) return Status::Ok();
  return Status::NotSupported(std::string(name) + ": the CUDA kernels need 16-byte aligned rows (a 16-byte aligned "
                              "base pointer and strides that are multiples of 8 elements)");
}

// Copies the index arrays to the host (one synchronisation) and range-checks them.
Status check_indices_on_host(const KVCacheParams& p, cudaStream_t stream) {
  std::vector<int32_t> cu, seqlens, leftpad, batch_idx, table;
  auto fetch = [&](const int32_t* src, std::vector<int32_t>& dst, std::size_t n) {
    if (src == nullptr) return cudaSuccess;
    dst.resize(n);
    return cudaMemcpyAsync(dst.data(), src, n * 4, cudaMemcpyDeviceToHost, stream);
  };
  FA_RETURN_IF_ERROR(cuda_error(fetch(p.cu_seqlens_q, cu, p.batch + 1), "copying cu_seqlens_q"));
  FA_RETURN_IF_ERROR(cuda_error(fetch(p.cache_seqlens, seqlens, p.batch), "copying cache_seqlens"));
  FA_RETURN_IF_ERROR(cuda_error(fetch(p.cache_leftpad, leftpad, p.batch), "copying cache_leftpad"));
  FA_RETURN_IF_ERROR(cuda_error(fetch(p.cache_batch_idx, batch_idx, p.batch), "copying cache_batch_idx"));
  KVCacheParams host = p;
  if (p.block_table) {
    const std::size_t width = std::size_t(p.max_blocks_per_seq) * 4;
    table.resize(std::size_t(p.batch) * p.max_blocks_per_seq);
    FA_RETURN_IF_ERROR(cuda_error(cudaMemcpy2DAsync(table.data(), width, p.block_table, p.block_table_stride * 4, width,
                                                    p.batch, cudaMemcpyDeviceToHost, stream),
                                  "copying block_table"));
    host.block_table_stride = p.max_blocks_per_seq;
  }
  FA_RETURN_IF_ERROR(cuda_error(cudaStreamSynchronize(stream), "synchronising for the index checks"));
  auto ptr = [](const std::vector<int32_t>& v) { return v.empty() ? nullptr : v.data(); };
  return kv::check_indices(host, {ptr(cu), ptr(seqlens), ptr(leftpad), ptr(batch_idx), ptr(table)});
}

// ----------------------------------------------------------------------------------------------------
// Launch plan: heads per CTA and splits of the key range
// ----------------------------------------------------------------------------------------------------

// Calls f(DecodeKernel<D, E>{}) for the smallest built head-dim specialisation D >= head_dim; false when
// none is built.
template <typename E, int D, int... Rest, typename F>
bool with_kernel(int head_dim, F&& f) {
  if constexpr (head_dim_built(D)) {
    if (head_dim <= D) {
      f(decode::DecodeKernel<D, E>{});
      return true;
    }
  }
  if constexpr (sizeof...(Rest) > 0) {
    return with_kernel<E, Rest...>(head_dim, f);
  } else {
    return false;
  }
}
template <typename F>
bool with_kernel(DType dtype, int head_dim, F&& f) {
  if (dtype == DType::kFloat16) return with_kernel<__half, 32, 64, 96, 128, 192, 256>(head_dim, f);
  return with_kernel<__nv_bfloat16, 32, 64, 96, 128, 192, 256>(head_dim, f);
}

struct DeviceShape {
  int sms = 1;
  int major = 0;       // compute capability
  int smem_optin = 0;  // shared memory a CTA may have, bytes
};

DeviceShape device_shape() {
  int device = 0;
  DeviceShape d;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  return d;
}

struct Plan {
  int splits = 1;
  int ctas_per_split = 1;
  int warps = decode::kDecodeWarps;  // per CTA (DecodeArgs::warps)
  bool cluster = false;  // splits merged through distributed shared memory (DecodeArgs::cluster)
  bool tma = false;      // K / V by TMA tiles where the kernel can (DecodeArgs::tma)
  // Splits merged through fp32 partials and arrival counters in the workspace.
  bool partials() const { return splits > 1 && !cluster; }
};

// Key blocks of the capacity, and the blocks of one of `splits` runs as the kernel cuts them (cta_keys):
// whole rounds of the CTA's warps.
int64_t key_blocks(const KVCacheParams& p) {
  return std::max<int64_t>(1, (p.capacity() + decode::kDecodeBlock - 1) / decode::kDecodeBlock);
}
int64_t split_blocks(int64_t blocks, int splits, int warps) {
  return ((blocks + splits - 1) / splits + warps - 1) / warps * warps;
}

// Hopper: the splits of a tile can run as one thread block cluster and merge through distributed shared
// memory when they fit in a portable cluster: no partials, no counters to zero (one graph node less), no
// merge through L2. H200, same run (H 32 / Hk 8, D 128, time per call in a CUDA graph): B = 1, 1k keys
// 12.7 -> 7.8 us; B = 8, 1k 19.2 -> 14.9 us, 8k 72.9 -> 68.4 us.
// But clusters of three or more 4-warp CTAs (three of which fit an SM) slow the main loop down (issue #6,
// benchmarks/results/h200_decode_mid_ab.csv): B = 4 (4 splits) at 8k / 32k / 128k keys 44.6 / 155.6 /
// 595.8 us as clusters, 42.1 / 135.0 / 506.9 through partials; B = 3 (5 splits) at 32k 120.4 -> 106.5;
// B = 2 with 8 4-warp splits at 128k 287.1 -> 259.7; B = 16 (3 splits) at 8k 144.5 -> 137.6. The cluster
// still wins where a warp's share of the split is short, so that the merge is a large part of the time
// (B = 1 / 2 / 4 at 1k keys, 2-4 blocks per warp: 8.0 / 9.6 / 12.0 us against 11.3 / 12.3 / 14.2; B = 3 at
// 8k, 26 blocks, about even: 35.8 / 34.9 and 33.8 / 34.2 us in two runs), for clusters of two 4-warp CTAs
// at every length (B = 6 and 8, 2 splits: 0.6-16 % faster) and for the wide CTA, one per SM (B = 1 and 2:
// 7-17 % faster).
// FLASH_ATTENTION_DECODE_CLUSTER (read per call, for A/B runs): unset = that rule, "1" = every split count
// that fits a cluster (the plan before issue #6), "0" = never.
void choose_merge(const KVCacheParams& p, const DeviceShape& dev, Plan& plan) {
  constexpr int64_t kShortSplitBlocks = 16;  // key blocks per warp
  const bool fits = dev.major >= 9 && plan.splits > 1 && plan.splits <= decode::kMaxClusterSplits;
  const char* env = std::getenv("FLASH_ATTENTION_DECODE_CLUSTER");
  if (env != nullptr && (env[0] == '0' || env[0] == '1')) {
    plan.cluster = fits && env[0] == '1';
    return;
  }
  const int64_t per_warp = split_blocks(key_blocks(p), plan.splits, plan.warps) / plan.warps;
  const bool fast = plan.warps == decode::kDecodeWarpsWide || plan.splits <= 2 || per_warp <= kShortSplitBlocks;
  plan.cluster = fits && fast;
}

// Key blocks per warp from which the TMA tiles pay (choose_tma).
constexpr int64_t kTmaMinBlocks = 4;

// Time model of one launch (microseconds) for the many-CTA regime of make_plan, fitted to H200
// measurements (benchmarks/results/h200_decode_diag.csv): a wave of resident CTAs lasts kCtaUs + blocks
// per warp x kBlockUs; each split adds kSplitUs (partials, merge). Its argmin fills the resident slots in
// whole waves.
double model_us(const KVCacheParams& p, int64_t ctas, int64_t blocks_per_warp, int splits, int64_t slots) {
  constexpr double kCtaUs = 12.0, kBlockUs = 1.75, kSplitUs = 0.2;
  const double waves = double((ctas + slots - 1) / slots);
  const double block_us = kBlockUs * std::max(0.25, p.head_dim / 128.0);
  return waves * (kCtaUs + blocks_per_warp * block_us) + (splits > 1 ? kSplitUs * splits : 0.0);
}

// The wide CTA (decode::kDecodeWarpsWide = 8 warps; sm90 and later where its shared memory fits, head dims
// with DecodeKernel::kHasWide): the same warps in flight as 4-warp CTAs with half the splits. For few
// tiles the split rule puts one CTA on about every SM: B = 1 at H 32 / Hk 8 above 1k keys asks for 12-16
// splits, past the portable cluster of 8, so they merge through fp32 partials, arrival counters and a
// memset; 8 wide CTAs per tile form one cluster and merge through distributed shared memory
// (choose_merge). A wide CTA takes 141 KB of shared memory at hdim 128, so one per SM: a cluster spreads
// over 8 SMs. FLASH_ATTENTION_DECODE_WIDE (read per call; the host plan only, for A/B runs):
//   unset / "auto": wide only there (no explicit num_splits, few CTAs, 4-warp splits in 9..16 or 8 long ones);
//   "1": wide wherever it is built, with half the 4-warp split count (an explicit num_splits is kept as is);
//   "0": never (the 4-warp plan).
//
// How a CTA width other than 4 warps is chosen: never, by the measured rule, or wherever it can run.
enum class Width { kNever, kAuto, kAlways };

// The wide or the narrow CTA (warps): kNever where it is not built, its shared memory does not fit this
// device (sm120: 99 KB) or the device is not sm90; else by the variable env_name: "0" / "1" / unset (kAuto).
Width width_choice(const KVCacheParams& p, const DeviceShape& dev, int warps, const char* env_name) {
  bool fits = false;
  with_kernel(p.dtype, p.head_dim, [&](auto kernel) {
    using K = decltype(kernel);
    const bool built = warps == decode::kDecodeWarpsWide ? K::kHasWide : K::kHasNarrow;
    fits = built && K::smem_bytes(warps) <= dev.smem_optin;
  });
  if (dev.major < 9 || !fits) return Width::kNever;
  const char* env = std::getenv(env_name);
  if (env != nullptr && env[0] == '0') return Width::kNever;
  if (env != nullptr && env[0] == '1') return Width::kAlways;
  return Width::kAuto;
}

// The narrow CTA (decode::kDecodeWarpsNarrow = 3 warps; sm90, head dims with DecodeKernel::kHasNarrow) for
// the many-CTA regime: with TMA tiles four fit per SM where three 4-warp CTAs do (hdim 128: 54 KB of shared
// memory, 168 registers), the same 12 warps per SM in 4 / 3 as many slots, so that B x Hk tiles that
// overflow the 4-warp slots by a part-wave (B = 64 at H 32 / Hk 8: 512 tiles, 396 slots) fit in one wave
// (528), each warp taking 4 / 3 as many key blocks. H200, same run (benchmarks/NOTES.md, session 9; us per
// call, 4-warp / narrow): B = 64 1k 70.8 / 67.4, 8k 485 / 475, 32k 1879 / 1873; B = 32 8k 249 / 241, 32k
// 946 / 933. The time model weighs it against the 4-warp plans, and takes it only where the model says it
// is kNarrowMargin faster: one long wave of narrow CTAs leaves 3 % of the slots empty (512 of 528), which
// the model does not see and which cost more than its per-wave saving at B = 64 128k (10 4-warp splits in
// 13 waves 7369 us, one narrow wave 7482; the model: 0.6 % for narrow).
// FLASH_ATTENTION_DECODE_NARROW (read per call; the host plan only, for A/B runs): unset = the model's
// choice, "1" = narrow CTAs wherever the many-CTA regime plans (with the model's split count), "0" = never.
constexpr double kNarrowMargin = 0.99;

// Splits of the key blocks of the capacity: the requested count or the model's choice, at most kMaxSplits,
// each a whole number of rounds of the CTA's warps (so that no split is empty), and the CTA width.
Plan split_plan(const KVCacheParams& p, const DeviceShape& dev) {
  const Width wide = width_choice(p, dev, decode::kDecodeWarpsWide, "FLASH_ATTENTION_DECODE_WIDE");
  Plan plan;
  const int tiles = (p.seqlen_q * (p.num_heads / p.num_heads_k) + decode::kDecodeRows - 1) / decode::kDecodeRows;
  plan.ctas_per_split = tiles * p.num_heads_k;
  const int64_t blocks = key_blocks(p);
  // Rounds of the CTA's warps, as the kernel cuts them; widen() switches to the wide CTA.
  auto fewest = [&](int splits, int warps) {
    const int64_t per = split_blocks(blocks, splits, warps);
    return static_cast<int>((blocks + per - 1) / per);
  };
  auto widen = [&](int splits) {
    plan.warps = decode::kDecodeWarpsWide;
    return (splits + 1) / 2;
  };
  const int max_splits = static_cast<int>(std::min<int64_t>(decode::kMaxSplits, blocks));
  if (p.num_splits > 0) {
    if (wide == Width::kAlways) plan.warps = decode::kDecodeWarpsWide;
    plan.splits = fewest(std::min(p.num_splits, max_splits), plan.warps);
    return plan;
  }
  // Two regimes, measured on the H200 (H 32 / Hk 8, D 128; benchmarks/results/h200_decode_splits.csv and
  // benchmarks/NOTES.md). Few CTAs per split (B x Hk < SMs / 2): the best count puts about one CTA on
  // every SM (B = 1: 16 splits from 8k to 128k keys, B = 8: 2), with at least kMinBlocks key blocks per
  // split (B = 1, 1k keys: 8); more CTAs only add partials to merge. Counts of 9-16 become half as many
  // wide CTAs. Many CTAs: 3 fit per SM, and a count that fills whole waves wins at long caches
  // (B = 64: 3 splits at 8k-32k, 10 at 128k, +6-14 % over 1 split across two runs), so the time model
  // below picks it, keeping kMinBlocksMany blocks per split (B = 64, 1k keys: one split, 9 % faster than
  // two), or the narrow CTA (four per SM) where that fits the tiles in fewer waves.
  constexpr int64_t kMinBlocks = 8, kMinBlocksMany = 64;
  const int64_t sms = dev.sms;
  const int64_t fill = sms / (int64_t(plan.ctas_per_split) * p.batch);
  if (fill >= 2) {
    int splits = int(std::min<int64_t>({fill, std::max<int64_t>(1, blocks / kMinBlocks), max_splits}));
    // Wide where it measured faster (H200, session 5, benchmarks/results/h200_decode_wide_ab.csv): 9-16
    // splits (B = 1 from 2k keys: 13.0 -> 9.3 us at 2k, 18.7 -> 15.5 at 8k, 136 -> 132 at 128k) and 8 long
    // splits (B = 2 from 8k keys: -4 / -10 / -12 % at 8k / 32k / 128k); not 8 short splits (B = 1, 1k:
    // +12 %) or 2-4 (B = 4: +7-9 %, B = 8: +6 %).
    const bool past_cluster = splits > decode::kMaxClusterSplits && splits <= 2 * decode::kMaxClusterSplits;
    const bool long_splits = splits == decode::kMaxClusterSplits &&
                             blocks >= int64_t(splits) * 4 * decode::kDecodeWarpsWide;
    if (wide == Width::kAlways || (wide == Width::kAuto && (past_cluster || long_splits))) splits = widen(splits);
    plan.splits = fewest(splits, plan.warps);
    return plan;
  }
  const int most = int(std::min<int64_t>(max_splits, std::max<int64_t>(1, blocks / kMinBlocksMany)));
  double best = 1e300;
  Width narrow = wide == Width::kAlways ? Width::kNever
                                        : width_choice(p, dev, decode::kDecodeWarpsNarrow, "FLASH_ATTENTION_DECODE_NARROW");
  int per_sm[2] = {0, 0};  // 4-warp, narrow
  with_kernel(p.dtype, p.head_dim, [&](auto kernel) {
    using K = decltype(kernel);
    per_sm[0] = K::ctas_per_sm(decode::kDecodeWarps);
    if (narrow != Width::kNever) per_sm[1] = K::ctas_per_sm(decode::kDecodeWarpsNarrow);
  });
  // Only where the narrow CTAs keep as many warps per SM (hdim 128: 4 x 3 = 3 x 4; not hdim 64: 5 x 3 < 4 x 4)
  // and where TMA tiles can serve the call (DecodeKernel::run: whole head dims, paged caches without left
  // padding): with cp.async rows three narrow CTAs fit per SM, not four.
  const bool tma_holds = p.head_dim % 64 == 0 && (p.block_table == nullptr || p.cache_leftpad == nullptr);
  if (narrow == Width::kAuto &&
      (!tma_holds || per_sm[1] * decode::kDecodeWarpsNarrow < per_sm[0] * decode::kDecodeWarps)) {
    narrow = Width::kNever;
  }
  for (const int warps : {decode::kDecodeWarps, decode::kDecodeWarpsNarrow}) {
    if (warps == decode::kDecodeWarpsNarrow ? narrow == Width::kNever : narrow == Width::kAlways) continue;
    const int64_t slots = sms * std::max(per_sm[warps == decode::kDecodeWarpsNarrow], 1);
    for (int s = 1; s <= most; ++s) {
      const int splits = fewest(s, warps);
      const int64_t per = split_blocks(blocks, splits, warps);
      // The narrow CTA is for TMA tiles (choose_tma: from kTmaMinBlocks blocks per warp).
      if (warps == decode::kDecodeWarpsNarrow && narrow == Width::kAuto && per / warps < kTmaMinBlocks) continue;
      const double t = model_us(p, int64_t(plan.ctas_per_split) * p.batch * splits, per / warps, splits, slots);
      if (t < best * (warps == decode::kDecodeWarpsNarrow && narrow == Width::kAuto ? kNarrowMargin : 1.0)) {
        best = t, plan.splits = splits, plan.warps = warps;
      }
    }
  }
  if (wide == Width::kAlways) {
    const int splits = widen(plan.splits);  // sets plan.warps
    plan.splits = fewest(splits, plan.warps);
  }
  return plan;
}

// K / V blocks by 2-D TMA (sm90; decode_kernel.cuh, "TMA tiles") instead of 16-byte cp.async rows. The
// kernel falls back to cp.async where the tiles do not hold (a padded head dim, a paged cache with left
// padding, strides the driver refuses). H200, H 32 / Hk 8, D 128, same runs (benchmarks/NOTES.md, session 7):
// 3-6 % faster from 4 key blocks per warp on (B = 1 128k 131.5 -> 125.1 us, B = 8 32k 251.2 -> 239.5, B = 64
// 32k 1992 -> 1878), 1.4 % slower with 2 (B = 1, 1k: 7.91 -> 8.02 us; the mbarrier set-up and the first
// descriptor fetch are not paid back), so by default only from kTmaMinBlocks blocks per warp.
// FLASH_ATTENTION_DECODE_TMA (read per call, for A/B runs): unset = that rule, "1" = TMA tiles wherever they
// hold, "0" = never.
void choose_tma(const KVCacheParams& p, const DeviceShape& dev, Plan& plan) {
  plan.tma = false;
  if (dev.major < 9) return;
  const char* env = std::getenv("FLASH_ATTENTION_DECODE_TMA");
  if (env != nullptr && (env[0] == '0' || env[0] == '1')) {
    plan.tma = env[0] == '1';
    return;
  }
  plan.tma = split_blocks(key_blocks(p), plan.splits, plan.warps) / plan.warps >= kTmaMinBlocks;
}

Plan make_plan(const KVCacheParams& p) {
  DeviceShape dev = device_shape();
  // The sm90-only plans (wide CTA, cluster merge, TMA tiles) need the kernels' sm90 code, not only an sm90
  // device: a build without sm90 runs its sm80 code there.
  with_kernel(p.dtype, p.head_dim, [&](auto kernel) { dev.major = std::min(dev.major, kernel.arch_major()); });
  Plan plan = split_plan(p, dev);
  choose_merge(p, dev, plan);
  choose_tma(p, dev, plan);
  return plan;
}

// ----------------------------------------------------------------------------------------------------
// Workspace and dispatch
// ----------------------------------------------------------------------------------------------------

struct Workspace {
  std::size_t q_rot = 0, out_accum = 0, lse_accum = 0, counters = 0, counter_bytes = 0, total = 0;
};

int64_t total_rows(const KVCacheParams& p) { return p.is_varlen() ? p.total_q : int64_t(p.batch) * p.seqlen_q; }

// The decode kernel reads q in 16-byte chunks (DecodeArgs::q): a 16-byte aligned base and strides of 8
// elements (a dimension with one index has no stride to keep). Other q are first copied into the workspace
// (rotate_q_kernel without rotary), as rotated q are.
bool q_aligned(const KVCacheParams& p) {
  auto ok = [](int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; };
  const TensorStrides& s = p.q_strides;
  return reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && ok(s.head, p.num_heads) &&
         (p.is_varlen() ? ok(s.row, p.total_q) : ok(s.row, p.seqlen_q) && ok(s.batch, p.batch));
}
bool copies_q(const KVCacheParams& p) { return p.has_rotary() || !q_aligned(p); }

Workspace workspace_layout(const KVCacheParams& p, const Plan& plan) {
  auto round = [](std::size_t x) { return (x + 255) / 256 * 256; };
  const std::size_t elems = std::size_t(total_rows(p)) * p.num_heads * p.head_dim;
  Workspace w;
  std::size_t at = 0;
  if (copies_q(p)) w.q_rot = at, at += round(elems * dtype_size(p.dtype));
  if (plan.partials()) {
    w.out_accum = at, at += round(plan.splits * elems * 4);
    w.lse_accum = at, at += round(std::size_t(plan.splits) * total_rows(p) * p.num_heads * 4);
    w.counter_bytes = std::size_t(p.batch) * plan.ctas_per_split * 4;
    w.counters = at, at += round(w.counter_bytes);
  }
  w.total = at;
  return w;
}

DecodeArgs decode_args(const KVCacheParams& p, const Plan& plan) {
  DecodeArgs a;
  a.q = p.q;
  a.q_batch = p.q_strides.batch, a.q_row = p.q_strides.row, a.q_head = p.q_strides.head;
  a.cu_seqlens_q = p.cu_seqlens_q;
  a.k = p.k_cache, a.v = p.v_cache;
  a.k_batch = p.k_cache_strides.batch, a.k_row = p.k_cache_strides.row, a.k_head = p.k_cache_strides.head;
  a.v_batch = p.v_cache_strides.batch, a.v_row = p.v_cache_strides.row, a.v_head = p.v_cache_strides.head;
  a.block_table = p.block_table;
  a.block_table_stride = p.block_table_stride;
  a.page_size = p.cache_seqlen;
  a.max_blocks = p.max_blocks_per_seq;
  a.cache_batch = p.cache_batch;
  a.cache_batch_idx = p.cache_batch_idx;
  a.cache_seqlens = p.cache_seqlens;
  a.cache_leftpad = p.cache_leftpad;
  a.capacity = static_cast<int>(p.capacity());
  a.seqlen_new = p.seqlen_new;
  a.batch = p.batch, a.seqlen_q = p.seqlen_q, a.heads = p.num_heads, a.heads_k = p.num_heads_k;
  a.head_dim = p.head_dim;
  a.total_rows = total_rows(p);
  a.scale = p.softmax_scale, a.softcap = p.softcap;
  a.alibi = p.alibi_slopes, a.alibi_batch_stride = p.alibi_batch_stride;
  a.window_left = p.window_left, a.window_right = p.window_right;
  a.num_splits = plan.splits;
  a.cluster = plan.cluster;
  a.tma = plan.tma;
  a.warps = plan.warps;
  a.out = p.out;
  a.out_batch = p.out_strides.batch, a.out_row = p.out_strides.row, a.out_head = p.out_strides.head;
  a.lse = p.softmax_lse;
  return a;
}

template <typename E>
Status run(const KVCacheParams& p, const Plan& plan, char* ws_base, const Workspace& ws, cudaStream_t stream) {
  const Rotary ro = rotary_of(p);
  if (p.has_new_kv()) {
    const dim3 grid((p.seqlen_new * p.num_heads_k + 3) / 4, p.batch);
    append_kernel<E><<<grid, 128, 0, stream>>>(p, ro);
    FA_RETURN_IF_ERROR(cuda_error(cudaGetLastError(), "append kernel launch"));
  }
  DecodeArgs a = decode_args(p, plan);
  if (copies_q(p)) {  // rotated, or only copied into aligned rows (ro.dim = 0)
    E* q_rot = reinterpret_cast<E*>(ws_base + ws.q_rot);
    const bool per_row = p.window_left >= 0 || (p.window_right >= 0 && p.window_right < p.capacity());
    const dim3 grid((p.seqlen_q * p.num_heads + 3) / 4, p.batch);
    rotate_q_kernel<E><<<grid, 128, 0, stream>>>(p, ro, q_rot, per_row);
    FA_RETURN_IF_ERROR(cuda_error(cudaGetLastError(), "rotary kernel launch"));
    a.q = q_rot;
    a.q_head = p.head_dim, a.q_row = int64_t(p.num_heads) * p.head_dim, a.q_batch = p.seqlen_q * a.q_row;
  }
  if (plan.partials()) {
    a.out_accum = reinterpret_cast<float*>(ws_base + ws.out_accum);
    a.lse_accum = reinterpret_cast<float*>(ws_base + ws.lse_accum);
    a.counters = reinterpret_cast<int32_t*>(ws_base + ws.counters);
    FA_RETURN_IF_ERROR(cuda_error(cudaMemsetAsync(a.counters, 0, ws.counter_bytes, stream), "zeroing the counters"));
  }
  Status status = Status::Ok();
  const bool built = with_kernel<E, 32, 64, 96, 128, 192, 256>(
      p.head_dim, [&](auto kernel) { status = decltype(kernel)::run(a, stream); });
  if (!built) {
    return Status::NotSupported("no CUDA KV-cache kernel was built for head_dim " + std::to_string(p.head_dim) +
                                " (FLASH_ATTENTION_HEADDIMS)");
  }
  return status;
}

}  // namespace

std::size_t kvcache_workspace_size(const KVCacheParams& params) {
  return workspace_layout(params, make_plan(params)).total;
}

Status kvcache_forward(const KVCacheParams& p) {
  if (p.dtype == DType::kFloat32) {
    return Status::NotSupported("the CUDA KV-cache kernels serve float16 and bfloat16 (got float32)");
  }
  FA_RETURN_IF_ERROR(check_alignment(p.k_cache, p.k_cache_strides, "k_cache"));
  FA_RETURN_IF_ERROR(check_alignment(p.v_cache, p.v_cache_strides, "v_cache"));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (p.check_indices) FA_RETURN_IF_ERROR(check_indices_on_host(p, stream));

  const Plan plan = make_plan(p);
  const Workspace ws = workspace_layout(p, plan);
  char* base = static_cast<char*>(p.workspace);
  void* owned = nullptr;
  if (ws.total > 0 && base == nullptr) {
    FA_RETURN_IF_ERROR(cuda_error(cudaMallocAsync(&owned, ws.total, stream), "allocating the KV-cache workspace"));
    base = static_cast<char*>(owned);
  } else if (ws.total > p.workspace_bytes) {
    return Status::InvalidArgument("workspace_bytes (" + std::to_string(p.workspace_bytes) +
                                   ") is smaller than kvcache_workspace_size() (" + std::to_string(ws.total) + ")");
  }
  const Status status = p.dtype == DType::kFloat16 ? run<__half>(p, plan, base, ws, stream)
                                                   : run<__nv_bfloat16>(p, plan, base, ws, stream);
  if (owned) cudaFreeAsync(owned, stream);
  return status;
}

Status combine(const CombineParams& params) { return launch_combine(params); }

}  // namespace flash_attention::cuda
