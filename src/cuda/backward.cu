// CUDA backward dispatch: the sm90 backward (src/cuda/sm90/bwd_*.h) on Hopper where it serves the call
// (FLASH_ATTENTION_BWD_PATH, see run_on_path, overrides the choice); else the sm80 path below, which
// runs on sm80 and later, Hopper included.
//
// Picks the smallest compiled head-dim specialisation >= head_dim (the kernels zero-pad the rest) and
// runs src/cuda/sm80/bwd_launch.h's three kernels; inputs that cannot move in 16-byte pieces (head dim
// not a multiple of 8, odd strides, unaligned pointers) run on zero-padded packed copies (repack.h). Scratch memory (dsum + fp32 dQ accumulators,
// 4 * H * total_q * (1 + splits * padded_head_dim) bytes) is taken with cudaMallocAsync on
// params.stream and freed on it after the last kernel; it is stream-ordered, so no synchronisation.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/dispatch.h"
#include "cuda/cuda_api.h"
#include "cuda/repack.h"
#include "cuda/sm80/bwd_api.h"
#include "cuda/sm80/kernel_traits.h"
#ifdef FLASH_ATTENTION_WITH_SM90
#include "cuda/sm90/sm90_api.h"
#endif

namespace flash_attention::cuda {
namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool rows_vectorisable(const void* ptr, const TensorStrides& s, bool varlen) {
  return aligned16(ptr) && s.row % 8 == 0 && s.head % 8 == 0 && (varlen || s.batch % 8 == 0);
}

// Can the kernels move every row of every tensor in 16-byte pieces?
bool vectorisable(const BackwardParams& p) {
  const bool v = p.is_varlen();
  return p.head_dim % 8 == 0 && rows_vectorisable(p.q, p.q_strides, v) && rows_vectorisable(p.k, p.k_strides, v) &&
         rows_vectorisable(p.v, p.v_strides, v) && rows_vectorisable(p.out, p.out_strides, v) &&
         rows_vectorisable(p.dout, p.dout_strides, v) && rows_vectorisable(p.dq, p.dq_strides, v) &&
         rows_vectorisable(p.dk, p.dk_strides, v) && rows_vectorisable(p.dv, p.dv_strides, v);
}

sm80::BwdKernelParams kernel_params(const BackwardParams& p) {
  sm80::BwdKernelParams k{};
  k.q = p.q, k.k = p.k, k.v = p.v, k.out = p.out, k.dout = p.dout, k.lse = p.softmax_lse;
  k.q_batch = p.q_strides.batch, k.q_row = p.q_strides.row, k.q_head = p.q_strides.head;
  k.k_batch = p.k_strides.batch, k.k_row = p.k_strides.row, k.k_head = p.k_strides.head;
  k.v_batch = p.v_strides.batch, k.v_row = p.v_strides.row, k.v_head = p.v_strides.head;
  k.o_batch = p.out_strides.batch, k.o_row = p.out_strides.row, k.o_head = p.out_strides.head;
  k.do_batch = p.dout_strides.batch, k.do_row = p.dout_strides.row;
  k.do_head = p.dout_strides.head;
  k.dq = p.dq, k.dk = p.dk, k.dv = p.dv;
  k.dq_batch = p.dq_strides.batch, k.dq_row = p.dq_strides.row, k.dq_head = p.dq_strides.head;
  k.dk_batch = p.dk_strides.batch, k.dk_row = p.dk_strides.row, k.dk_head = p.dk_strides.head;
  k.dv_batch = p.dv_strides.batch, k.dv_row = p.dv_strides.row, k.dv_head = p.dv_strides.head;
  k.cu_seqlens_q = p.cu_seqlens_q, k.cu_seqlens_k = p.cu_seqlens_k;
  k.batch = p.batch, k.seqlen_q = p.seqlen_q, k.seqlen_k = p.seqlen_k;
  k.num_heads = p.num_heads, k.num_heads_k = p.num_heads_k, k.head_dim = p.head_dim;
  k.total_q = p.total_q;
  k.scale = p.softmax_scale;
  k.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  k.softcap = p.softcap;
  k.window_left = p.window_left, k.window_right = p.window_right;
  k.alibi_slopes = p.alibi_slopes, k.alibi_batch_stride = p.alibi_batch_stride;
  k.dropout_p = p.dropout_p;
  k.dropout_rescale = 1.f / (1.f - p.dropout_p);
  k.philox_seed = p.philox_seed, k.philox_offset = p.philox_offset;
  k.deterministic = p.deterministic;
  return k;
}

Status run_sm80(const BackwardParams& p) {
  const sm80::BwdKernelParams k = kernel_params(p);
  return dispatch_headdim(p.head_dim, [&](auto hdim) {
    constexpr int kHeadDim = decltype(hdim)::value;
    return dispatch_dtype(p.dtype, [&](auto dtype) {
      constexpr DType kDType = decltype(dtype)::value;
      return dispatch_bool(p.dropout_p > 0.f, [&](auto dropout) {
        using Element = sm80::ElementOf<kDType>;
        if constexpr (kHeadDim == 0 || !dtype_built(kDType)) {
          return Status::Internal("backward: no kernel was built for this call");
        } else {
          return sm80::run_bwd<kHeadDim, Element, decltype(dropout)::value>(k, {}, p.stream);
        }
      });
    });
  });
}

StridedView view_of(const void* data, const TensorStrides& s, const BackwardParams& p, bool is_q) {
  const bool v = p.is_varlen();
  const int64_t rows = v ? (is_q ? p.total_q : p.total_k) : (is_q ? p.seqlen_q : p.seqlen_k);
  const int heads = is_q ? p.num_heads : p.num_heads_k;
  return StridedView{data, v ? 0 : s.batch, s.row, s.head, v ? 1 : p.batch, rows, heads, p.head_dim};
}

// Runs `p` on packed copies with the head dim zero-padded to a multiple of 8 (stream-ordered scratch):
// q, k, v, out, dout are packed, dq, dk, dv computed packed and unpacked into the caller's tensors.
Status run_packed(const BackwardParams& p) {
  const auto stream = static_cast<cudaStream_t>(p.stream);
  const int dp = (p.head_dim + 7) / 8 * 8;
  const StridedView q = view_of(p.q, p.q_strides, p, true), k = view_of(p.k, p.k_strides, p, false);
  const StridedView v = view_of(p.v, p.v_strides, p, false), o = view_of(p.out, p.out_strides, p, true);
  const StridedView dout = view_of(p.dout, p.dout_strides, p, true);
  const StridedView dq = view_of(p.dq, p.dq_strides, p, true), dk = view_of(p.dk, p.dk_strides, p, false);
  const StridedView dv = view_of(p.dv, p.dv_strides, p, false);
  const int64_t q_elems = int64_t(q.batch) * q.rows * q.heads * dp;
  const int64_t k_elems = int64_t(k.batch) * k.rows * k.heads * dp;
  void* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(&scratch, size_t(4 * q_elems + 4 * k_elems) * 2, stream);
  if (err != cudaSuccess) return Status::CudaError(std::string("backward: packed copies: ") + cudaGetErrorString(err));
  auto* base = static_cast<uint16_t*>(scratch);
  uint16_t *q2 = base, *o2 = q2 + q_elems, *do2 = o2 + q_elems, *dq2 = do2 + q_elems;
  uint16_t *k2 = dq2 + q_elems, *v2 = k2 + k_elems, *dk2 = v2 + k_elems, *dv2 = dk2 + k_elems;

  BackwardParams pp = p;
  pp.head_dim = dp;
  pp.q = q2, pp.out = o2, pp.dout = do2, pp.dq = dq2, pp.k = k2, pp.v = v2, pp.dk = dk2, pp.dv = dv2;
  const TensorStrides q_strides{p.is_varlen() ? 0 : q.rows * q.heads * dp, int64_t(q.heads) * dp, dp};
  const TensorStrides k_strides{p.is_varlen() ? 0 : k.rows * k.heads * dp, int64_t(k.heads) * dp, dp};
  pp.q_strides = pp.out_strides = pp.dout_strides = pp.dq_strides = q_strides;
  pp.k_strides = pp.v_strides = pp.dk_strides = pp.dv_strides = k_strides;
  Status st = pack(q, q2, dp, stream);
  if (st.ok()) st = pack(k, k2, dp, stream);
  if (st.ok()) st = pack(v, v2, dp, stream);
  if (st.ok()) st = pack(o, o2, dp, stream);
  if (st.ok()) st = pack(dout, do2, dp, stream);
  if (st.ok()) st = run_sm80(pp);
  if (st.ok()) st = unpack(dq2, dp, dq, stream);
  if (st.ok()) st = unpack(dk2, dp, dk, stream);
  if (st.ok()) st = unpack(dv2, dp, dv, stream);
  err = cudaFreeAsync(scratch, stream);
  if (st.ok() && err != cudaSuccess) st = Status::CudaError(std::string("backward: ") + cudaGetErrorString(err));
  return st;
}

#ifdef FLASH_ATTENTION_WITH_SM90
bool on_sm90() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major == 9;
}
#endif

// Why the sm90 backward does not serve `p` here ("" = it does).
std::string sm90_reason(const BackwardParams& p) {
#ifdef FLASH_ATTENTION_WITH_SM90
  if (!on_sm90()) return "the GPU is not sm90";
  return sm90::backward_unsupported_reason(p);
#else
  (void)p;
  return "this build has no sm90 kernels (FLASH_ATTENTION_CUDA_ARCHS without 90a)";
#endif
}

// FLASH_ATTENTION_BWD_PATH (developers, tests, benchmarks): unset or "auto" = the sm90 backward
// where it serves the call, else sm80; "sm80" = always sm80; "sm90" = sm90 or an error with its reason.
Status run_on_path(const BackwardParams& p) {
  const char* env = std::getenv("FLASH_ATTENTION_BWD_PATH");
  const std::string path = env == nullptr ? "auto" : env;
  if (path != "auto" && path != "sm80" && path != "sm90" && !path.empty()) {
    return Status::InvalidArgument("FLASH_ATTENTION_BWD_PATH must be auto, sm80 or sm90 (got '" + path + "')");
  }
  const std::string why = path == "sm80" ? "FLASH_ATTENTION_BWD_PATH=sm80" : sm90_reason(p);
#ifdef FLASH_ATTENTION_WITH_SM90
  if (why.empty()) return sm90::backward(p);
#endif
  if (path == "sm90") return Status::NotSupported("FLASH_ATTENTION_BWD_PATH=sm90: " + why);
  return vectorisable(p) ? run_sm80(p) : run_packed(p);
}

}  // namespace

Status backward(const BackwardParams& params) {
  if (params.dtype != DType::kFloat16 && params.dtype != DType::kBFloat16) {
    return Status::NotSupported("the CUDA backward supports float16 and bfloat16, not " +
                                std::string(dtype_name(params.dtype)));
  }
  if (!dtype_built(params.dtype)) {
    return Status::NotSupported(std::string("this build has no CUDA kernels for ") + dtype_name(params.dtype));
  }
  if (headdim_specialisation(params.head_dim) == 0) {
    return Status::NotSupported("the CUDA backward was not built for head_dim " + std::to_string(params.head_dim) +
                                " (FLASH_ATTENTION_HEADDIMS)");
  }
  return run_on_path(params);
}

}  // namespace flash_attention::cuda
