// CUDA forward dispatch: capability checks, the sm90 door, kernel-config selection (explicit or from
// the tuned table) and the launch of the sm80-path kernel; inputs the kernels cannot load with 16-byte
// vectors run on zero-padded packed copies.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "cuda/cuda_api.h"
#include "cuda/repack.h"
#include "cuda/sm80/fwd_api.h"
#include "cuda/sm80/tile_table.h"
#ifdef FLASH_ATTENTION_WITH_SM90
#include "cuda/sm90/sm90_api.h"
#endif

namespace flash_attention::cuda {
namespace {

#ifdef __CUDA_ARCH_LIST__
constexpr int kArchList[] = {__CUDA_ARCH_LIST__};  // e.g. 800, 900
#else
constexpr int kArchList[] = {800};
#endif

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string("flash_attention: ") + what + ": " + cudaGetErrorString(err);
}

// Compute capability (e.g. 90) and opt-in shared memory per block of the current device.
Status current_device(int* arch, int* smem_limit) {
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return Status::CudaError(cuda_error("querying the current device", err));
  *arch = major * 10 + minor;
  return Status::Ok();
}

// Machine code built for sm_a runs on sm_d when the major versions match and a <= d
// (90a code runs on sm_90 only, which the same rule gives).
bool arch_runs(int arch) {
  for (int a : kArchList) {
    if (a / 100 == arch / 10 && a / 10 <= arch) return true;
  }
  return false;
}

std::string built_archs_text() {
  std::string s;
  for (int a : kArchList) s += (s.empty() ? "sm_" : ", sm_") + std::to_string(a / 10);
  return s;
}

std::string headdims_text() {
  std::string s;
  for (int d : built::kHeadDims) s += (s.empty() ? "" : ",") + std::to_string(d);
  return s;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool strides_vectorisable(const TensorStrides& s, bool varlen) {
  return (varlen || s.batch % 8 == 0) && s.row % 8 == 0 && s.head % 8 == 0;
}

// Can the kernels load every row with 16-byte vectors?
bool vectorisable(const ForwardParams& p) {
  const bool v = p.is_varlen();
  return p.head_dim % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out) &&
         strides_vectorisable(p.q_strides, v) && strides_vectorisable(p.k_strides, v) &&
         strides_vectorisable(p.v_strides, v) && strides_vectorisable(p.out_strides, v);
}

sm80::FwdArgs make_args(const ForwardParams& p) {
  constexpr float kLog2e = 1.4426950408889634f;
  sm80::FwdArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.lse = p.softmax_lse;
  a.q_batch_stride = p.q_strides.batch, a.q_row_stride = p.q_strides.row, a.q_head_stride = p.q_strides.head;
  a.k_batch_stride = p.k_strides.batch, a.k_row_stride = p.k_strides.row, a.k_head_stride = p.k_strides.head;
  a.v_batch_stride = p.v_strides.batch, a.v_row_stride = p.v_strides.row, a.v_head_stride = p.v_strides.head;
  a.o_batch_stride = p.out_strides.batch, a.o_row_stride = p.out_strides.row, a.o_head_stride = p.out_strides.head;
  a.batch = p.batch, a.seqlen_q = p.seqlen_q, a.seqlen_k = p.seqlen_k;
  a.num_heads = p.num_heads, a.num_heads_k = p.num_heads_k, a.head_dim = p.head_dim;
  a.total_q = p.total_q;
  a.cu_seqlens_q = p.cu_seqlens_q;
  a.cu_seqlens_k = p.cu_seqlens_k;
  a.softcap = p.softcap > 0.f;
  a.score_scale = a.softcap ? p.softcap : p.softmax_scale;
  a.scale_log2 = a.score_scale * kLog2e;
  a.softcap_prescale = a.softcap ? p.softmax_scale / p.softcap : 1.f;
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  a.alibi_slopes = p.alibi_slopes;
  a.alibi_batch_stride = p.alibi_batch_stride;
  a.dropout_p = p.dropout_p;
  a.dropout_rescale = 1.f / (1.f - p.dropout_p);
  a.philox_seed = p.philox_seed;
  a.philox_offset = p.philox_offset;
  return a;
}

std::string configs_text(const std::vector<sm80::FwdKernel>& kernels) {
  std::string s;
  for (const auto& k : kernels) s += (s.empty() ? "" : ", ") + k.config.to_string();
  return s.empty() ? "none" : s;
}

// The tuned default of the nearest arch <= `arch` in the table, or null.
const char* default_config(int arch, int head_dim, DType dtype, bool masked) {
  const sm80::DefaultTile* best = nullptr;
  for (const auto& row : sm80::kDefaultTiles) {
    if (row.head_dim != head_dim || row.dtype != dtype || row.masked != masked || row.arch > arch) continue;
    if (best == nullptr || row.arch > best->arch) best = &row;
  }
  return best == nullptr ? nullptr : best->config;
}

// Chooses the kernel for `p`: the explicit config if given (an error if it was not built or does not
// fit), else the table's default, else the first built config that fits the device.
Status pick_kernel(const ForwardParams& p, int arch, int smem_limit, sm80::FwdKernel* out) {
  const int spec = headdim_specialisation(p.head_dim);
  const std::vector<sm80::FwdKernel> kernels = sm80::fwd_kernels(spec, p.dtype);
  auto fits = [&](const sm80::FwdKernel& k) { return k.smem_bytes <= smem_limit; };
  if (!p.config.is_auto()) {
    for (const auto& k : kernels) {
      if (!(k.config == p.config)) continue;
      if (!fits(k)) {
        return Status::NotSupported("config '" + p.config.to_string() + "' needs " + std::to_string(k.smem_bytes) +
                                    " bytes of shared memory; this GPU allows " + std::to_string(smem_limit));
      }
      *out = k;
      return Status::Ok();
    }
    return Status::InvalidArgument("config '" + p.config.to_string() + "' was not built for head dim " +
                                   std::to_string(spec) + " " + dtype_name(p.dtype) + "; built: " +
                                   configs_text(kernels));
  }
  const char* wanted = default_config(arch, spec, p.dtype, p.has_window());
  KernelConfig want;
  if (wanted != nullptr && KernelConfig::parse(wanted, &want).ok()) {
    for (const auto& k : kernels) {
      if (k.config == want && fits(k)) {
        *out = k;
        return Status::Ok();
      }
    }
  }
  for (const auto& k : kernels) {
    if (fits(k)) {
      *out = k;
      return Status::Ok();
    }
  }
  return Status::NotSupported("no built sm80 config for head dim " + std::to_string(spec) + " fits in " +
                              std::to_string(smem_limit) + " bytes of shared memory (built: " +
                              configs_text(kernels) + ")");
}

Status run_sm80(const ForwardParams& p, int arch, int smem_limit) {
  sm80::FwdKernel kernel;
  FA_RETURN_IF_ERROR(pick_kernel(p, arch, smem_limit, &kernel));
  return kernel.launch(make_args(p), static_cast<cudaStream_t>(p.stream));
}

StridedView view_of(const void* data, const TensorStrides& s, const ForwardParams& p, bool is_q, int heads) {
  const bool v = p.is_varlen();
  const int64_t rows = v ? (is_q ? p.total_q : p.total_k) : (is_q ? p.seqlen_q : p.seqlen_k);
  return StridedView{data, v ? 0 : s.batch, s.row, s.head, v ? 1 : p.batch, rows, heads, p.head_dim};
}

// Runs `p` on packed copies whose head dim is padded to a multiple of 8 (stream-ordered scratch).
Status run_packed(const ForwardParams& p, int arch, int smem_limit) {
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const int dp = (p.head_dim + 7) / 8 * 8;
  const StridedView q = view_of(p.q, p.q_strides, p, true, p.num_heads);
  const StridedView k = view_of(p.k, p.k_strides, p, false, p.num_heads_k);
  const StridedView v = view_of(p.v, p.v_strides, p, false, p.num_heads_k);
  const StridedView o = view_of(p.out, p.out_strides, p, true, p.num_heads);
  const int64_t q_elems = int64_t(q.batch) * q.rows * q.heads * dp;
  const int64_t k_elems = int64_t(k.batch) * k.rows * k.heads * dp;
  void* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(&scratch, size_t(2 * q_elems + 2 * k_elems) * 2, stream);
  if (err != cudaSuccess) return Status::CudaError(cuda_error("allocating packed copies", err));
  auto* base = static_cast<uint16_t*>(scratch);
  uint16_t *q2 = base, *o2 = base + q_elems, *k2 = o2 + q_elems, *v2 = k2 + k_elems;

  ForwardParams pp = p;
  pp.head_dim = dp;
  pp.q = q2, pp.k = k2, pp.v = v2, pp.out = o2;
  const bool varlen = p.is_varlen();
  pp.q_strides = pp.out_strides = {varlen ? 0 : q.rows * q.heads * dp, int64_t(q.heads) * dp, dp};
  pp.k_strides = pp.v_strides = {varlen ? 0 : k.rows * k.heads * dp, int64_t(k.heads) * dp, dp};
  Status st = pack(q, q2, dp, stream);
  if (st.ok()) st = pack(k, k2, dp, stream);
  if (st.ok()) st = pack(v, v2, dp, stream);
  if (st.ok()) st = run_sm80(pp, arch, smem_limit);
  if (st.ok()) st = unpack(o2, dp, o, stream);
  err = cudaFreeAsync(scratch, stream);
  if (st.ok() && err != cudaSuccess) st = Status::CudaError(cuda_error("freeing packed copies", err));
  return st;
}

// float8_e4m3 runs only on the sm90 path (no sm80 kernels, no repacking fallback).
std::string fp8_unsupported_reason(const ForwardParams& p, int arch) {
#ifdef FLASH_ATTENTION_WITH_SM90
  if (arch != 90) {
    return "float8_e4m3 runs only on the sm90 kernels (an sm_90 Hopper GPU); this GPU is " +
           (arch == 0 ? std::string("absent") : "sm_" + std::to_string(arch));
  }
  if (p.config.path == KernelPath::kSm80) {
    return "config '" + p.config.to_string() + "' selects the sm80 path, which has no float8_e4m3 kernels";
  }
  return sm90::unsupported_reason(p);
#else
  (void)p, (void)arch;
  return "float8_e4m3 runs only on the sm90 kernels: rebuild with FLASH_ATTENTION_CUDA_ARCHS including 90a";
#endif
}

}  // namespace

std::vector<int> archs_built() {
  std::vector<int> archs;
  for (int a : kArchList) archs.push_back(a / 10);
#ifdef FLASH_ATTENTION_WITH_SM90
  if (std::find(archs.begin(), archs.end(), 90) == archs.end()) archs.push_back(90);
#endif
  return archs;
}

std::string unsupported_reason(const ForwardParams& p, int arch) {
  if (p.dtype == DType::kFloat8E4M3) return fp8_unsupported_reason(p, arch);
  if (p.dtype == DType::kFloat32) return "the CUDA kernels take fp16 or bf16 inputs, not fp32";
  if (!dtype_built(p.dtype)) return std::string("this build has no CUDA kernels for ") + dtype_name(p.dtype);
  if (p.head_dim > 256) return "head_dim " + std::to_string(p.head_dim) + " > 256, the largest CUDA kernel";
  if (headdim_specialisation(p.head_dim) == 0) {
    return "no CUDA head-dim specialisation >= " + std::to_string(p.head_dim) + " was built (FLASH_ATTENTION_HEADDIMS=" +
           headdims_text() + ")";
  }
  if (arch == 0) return "no CUDA device";
  if (arch < 80) {
    return "compute capability " + std::to_string(arch / 10) + "." + std::to_string(arch % 10) +
           " < 8.0: the CUDA kernels need sm80 or newer";
  }
  if (!arch_runs(arch)) {
    return "the CUDA kernels were built for " + built_archs_text() + ", not for this GPU (sm_" + std::to_string(arch) +
           "); rebuild with FLASH_ATTENTION_CUDA_ARCHS including " + std::to_string(arch);
  }
  if (p.batch > 65535 || p.num_heads > 65535) return "batch and num_heads must be <= 65535 for the CUDA grid";
  return "";
}

std::vector<KernelConfig> configs(int arch, int head_dim, DType dtype) {
  std::vector<KernelConfig> out;
  if (arch < 80 || !arch_runs(arch)) return out;
  if (dtype != DType::kFloat8E4M3) {
    for (const auto& k : sm80::fwd_kernels(headdim_specialisation(head_dim), dtype)) out.push_back(k.config);
  }
#ifdef FLASH_ATTENTION_WITH_SM90
  if (arch == 90) {
    for (const auto& c : sm90::configs(head_dim, dtype)) out.push_back(c);
  }
#endif
  return out;
}

Status forward(const ForwardParams& p) {
  int arch = 0, smem_limit = 0;
  FA_RETURN_IF_ERROR(current_device(&arch, &smem_limit));
  const std::string why = unsupported_reason(p, arch);
  if (!why.empty()) return Status::NotSupported(why);
#ifdef FLASH_ATTENTION_WITH_SM90
  if (arch == 90 && p.config.path != KernelPath::kSm80) {
    const std::string sm90_why = sm90::unsupported_reason(p);
    if (sm90_why.empty()) return sm90::forward(p);
    if (p.config.path == KernelPath::kSm90) {
      return Status::InvalidArgument("config '" + p.config.to_string() + "': the sm90 path cannot run this call: " + sm90_why);
    }
  }
#endif
  if (p.config.path == KernelPath::kSm90) {
    return Status::InvalidArgument("config '" + p.config.to_string() + "': the sm90 path was not built for this GPU (" +
                                   "needs FLASH_ATTENTION_CUDA_ARCHS with 90a and an sm_90 device)");
  }
  return vectorisable(p) ? run_sm80(p, arch, smem_limit) : run_packed(p, arch, smem_limit);
}

}  // namespace flash_attention::cuda
