// validate() and normalize(): every malformed call is rejected here with a message that names the
// offending field, before any backend sees the parameters.
#include <cmath>
#include <string>

#include "flash_attention/flash_attention.h"

namespace flash_attention {
namespace {

constexpr int kCpuMaxHeadDim = 1024;

Status invalid(const std::string& field, const std::string& what) {
  return Status::InvalidArgument(field + " " + what);
}

std::string got(double v) {
  std::string s = std::to_string(v);
  return " (got " + s + ")";
}
std::string got(int64_t v) { return " (got " + std::to_string(v) + ")"; }

Status check_pointer(const void* ptr, const char* name, bool may_be_null) {
  if (ptr == nullptr && !may_be_null) return invalid(name, "is a null pointer");
  return Status::Ok();
}

Status check_strides(const TensorStrides& s, const std::string& name, bool varlen) {
  if (!varlen && s.batch < 0) return invalid(name + ".batch", "must be >= 0" + got(s.batch));
  if (s.row < 0) return invalid(name + ".row", "must be >= 0" + got(s.row));
  if (s.head < 0) return invalid(name + ".head", "must be >= 0" + got(s.head));
  return Status::Ok();
}

// Host-side cu_seqlens: starts at 0, non-decreasing, ends at total, no sequence above max_len.
Status check_cu_seqlens(const int32_t* cu, int batch, int64_t total, int max_len, const char* name) {
  const std::string n = name;
  if (cu[0] != 0) return invalid(n, "must start at 0" + got(int64_t{cu[0]}));
  for (int b = 0; b < batch; ++b) {
    const int64_t len = int64_t{cu[b + 1]} - cu[b];
    if (len < 0) return invalid(n, "must be non-decreasing (entry " + std::to_string(b + 1) + ")");
    if (len > max_len) {
      return invalid(n, "sequence " + std::to_string(b) + " has length " + std::to_string(len) +
                            " > max_seqlen (" + std::to_string(max_len) + ")");
    }
  }
  if (cu[batch] != total) {
    return invalid(n, "last entry (" + std::to_string(cu[batch]) + ") must equal the total rows (" +
                          std::to_string(total) + ")");
  }
  return Status::Ok();
}

Status check_shapes(const ForwardParams& p) {
  if (p.device != Device::kCPU && p.device != Device::kCUDA) {
    return invalid("device", "is not a known device" + got(int64_t{static_cast<int>(p.device)}));
  }
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat32 &&
      p.dtype != DType::kFloat8E4M3) {
    return invalid("dtype", "must be float16, bfloat16, float32 or float8_e4m3" +
                                got(int64_t{static_cast<int>(p.dtype)}));
  }
  if (p.batch < 1) return invalid("batch", "must be >= 1" + got(int64_t{p.batch}));
  const int min_seqlen = p.is_varlen() ? 0 : 1;
  if (p.seqlen_q < min_seqlen)
    return invalid("seqlen_q", "must be >= " + std::to_string(min_seqlen) + got(int64_t{p.seqlen_q}));
  if (p.seqlen_k < min_seqlen)
    return invalid("seqlen_k", "must be >= " + std::to_string(min_seqlen) + got(int64_t{p.seqlen_k}));
  if (p.num_heads < 1) return invalid("num_heads", "must be >= 1" + got(int64_t{p.num_heads}));
  if (p.num_heads_k < 1) return invalid("num_heads_k", "must be >= 1" + got(int64_t{p.num_heads_k}));
  if (p.num_heads % p.num_heads_k != 0) {
    return invalid("num_heads", "(" + std::to_string(p.num_heads) + ") must be a multiple of num_heads_k (" +
                                    std::to_string(p.num_heads_k) + ")");
  }
  if (p.head_dim < 1) return invalid("head_dim", "must be >= 1" + got(int64_t{p.head_dim}));
  if (p.device == Device::kCPU && p.head_dim > kCpuMaxHeadDim) {
    return invalid("head_dim",
                   "must be <= " + std::to_string(kCpuMaxHeadDim) + " on the CPU" + got(int64_t{p.head_dim}));
  }
  return Status::Ok();
}

Status check_varlen(const ForwardParams& p) {
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) {
    return invalid("cu_seqlens_q/cu_seqlens_k", "must be given together (varlen) or both be null");
  }
  if (!p.is_varlen()) return Status::Ok();
  if (p.total_q < 0) return invalid("total_q", "must be >= 0" + got(p.total_q));
  if (p.total_k < 0) return invalid("total_k", "must be >= 0" + got(p.total_k));
  if (p.device != Device::kCPU) return Status::Ok();  // device arrays: checked by the caller
  FA_RETURN_IF_ERROR(check_cu_seqlens(p.cu_seqlens_q, p.batch, p.total_q, p.seqlen_q, "cu_seqlens_q"));
  return check_cu_seqlens(p.cu_seqlens_k, p.batch, p.total_k, p.seqlen_k, "cu_seqlens_k");
}

Status check_options(const ForwardParams& p) {
  if (!std::isfinite(p.softmax_scale) || p.softmax_scale <= 0.f) {
    return invalid("softmax_scale", "must be finite and > 0" + got(double{p.softmax_scale}));
  }
  if (p.window_left < -1)
    return invalid("window_left", "must be >= -1 (-1 = unbounded)" + got(int64_t{p.window_left}));
  if (p.window_right < -1)
    return invalid("window_right", "must be >= -1 (-1 = unbounded)" + got(int64_t{p.window_right}));
  if (!std::isfinite(p.softcap) || p.softcap < 0.f) {
    return invalid("softcap", "must be finite and >= 0" + got(double{p.softcap}));
  }
  if (!(p.dropout_p >= 0.f && p.dropout_p < 1.f)) {
    return invalid("dropout_p", "must be in [0, 1)" + got(double{p.dropout_p}));
  }
  if (p.alibi_batch_stride < 0)
    return invalid("alibi_batch_stride", "must be >= 0" + got(p.alibi_batch_stride));
  if (p.alibi_slopes == nullptr && p.alibi_batch_stride != 0) {
    return invalid("alibi_batch_stride", "is set but alibi_slopes is null");
  }
  if (p.alibi_batch_stride != 0 && p.alibi_batch_stride < p.num_heads) {
    return invalid("alibi_batch_stride",
                   "must be 0 (one (H) vector) or >= num_heads" + got(p.alibi_batch_stride));
  }
  if (p.num_threads < 0) return invalid("num_threads", "must be >= 0" + got(int64_t{p.num_threads}));
  if (p.device == Device::kCPU && !p.config.is_auto()) {
    return invalid("config",
                   "'" + p.config.to_string() + "' selects a CUDA kernel; the CPU takes only \"auto\"");
  }
  return Status::Ok();
}

// float8_e4m3 is a CUDA (sm90) forward without varlen, dropout or alibi; descale factors go with it only.
Status check_fp8(const ForwardParams& p) {
  if (p.dtype != DType::kFloat8E4M3) {
    if (p.q_descale == nullptr && p.k_descale == nullptr && p.v_descale == nullptr) return Status::Ok();
    return invalid("q_descale/k_descale/v_descale",
                   std::string("are only for float8_e4m3 inputs (dtype is ") + dtype_name(p.dtype) + ")");
  }
  const std::string fp8 = "dtype float8_e4m3: ";
  if (p.device != Device::kCUDA) {
    return Status::NotSupported(fp8 + "runs only on CUDA (the sm90 kernels); the CPU takes float16, bfloat16 or float32");
  }
  if (p.is_varlen()) return Status::NotSupported(fp8 + "varlen (cu_seqlens) is not supported");
  if (p.dropout_p > 0.f) return Status::NotSupported(fp8 + "dropout is not supported");
  if (p.alibi_slopes != nullptr) return Status::NotSupported(fp8 + "alibi_slopes are not supported");
  return Status::Ok();
}

Status check_tensors(const ForwardParams& p) {
  const bool varlen = p.is_varlen();
  const bool no_q = varlen && p.total_q == 0, no_k = varlen && p.total_k == 0;
  FA_RETURN_IF_ERROR(check_pointer(p.q, "q", no_q));
  FA_RETURN_IF_ERROR(check_pointer(p.k, "k", no_k));
  FA_RETURN_IF_ERROR(check_pointer(p.v, "v", no_k));
  FA_RETURN_IF_ERROR(check_pointer(p.out, "out", no_q));
  FA_RETURN_IF_ERROR(check_pointer(p.softmax_lse, "softmax_lse", no_q));
  FA_RETURN_IF_ERROR(check_strides(p.q_strides, "q_strides", varlen));
  FA_RETURN_IF_ERROR(check_strides(p.k_strides, "k_strides", varlen));
  FA_RETURN_IF_ERROR(check_strides(p.v_strides, "v_strides", varlen));
  return check_strides(p.out_strides, "out_strides", varlen);
}

}  // namespace

Status validate(const ForwardParams& params) {
  FA_RETURN_IF_ERROR(check_shapes(params));
  FA_RETURN_IF_ERROR(check_varlen(params));
  FA_RETURN_IF_ERROR(check_options(params));
  FA_RETURN_IF_ERROR(check_fp8(params));
  return check_tensors(params);
}

Status validate(const BackwardParams& params) {
  FA_RETURN_IF_ERROR(validate(static_cast<const ForwardParams&>(params)));
  if (params.dtype == DType::kFloat8E4M3) {
    return Status::NotSupported("dtype float8_e4m3 has no backward (FP8 attention is forward only)");
  }
  const bool varlen = params.is_varlen();
  const bool no_q = varlen && params.total_q == 0, no_k = varlen && params.total_k == 0;
  FA_RETURN_IF_ERROR(check_pointer(params.dout, "dout", no_q));
  FA_RETURN_IF_ERROR(check_pointer(params.dq, "dq", no_q));
  FA_RETURN_IF_ERROR(check_pointer(params.dk, "dk", no_k));
  FA_RETURN_IF_ERROR(check_pointer(params.dv, "dv", no_k));
  FA_RETURN_IF_ERROR(check_strides(params.dout_strides, "dout_strides", varlen));
  FA_RETURN_IF_ERROR(check_strides(params.dq_strides, "dq_strides", varlen));
  FA_RETURN_IF_ERROR(check_strides(params.dk_strides, "dk_strides", varlen));
  return check_strides(params.dv_strides, "dv_strides", varlen);
}

// causal => window_right = 0. A window bound that lets every query row see every key on that side
// becomes -1 (left >= Sk - 1 always covers the start; right >= Sq - 1 always covers the end), and
// causal ends up true exactly when the mask is (unbounded left, right = 0).
void normalize(ForwardParams& params) {
  if (params.causal) params.window_right = 0;
  if (params.window_left >= params.seqlen_k - 1) params.window_left = -1;
  if (params.window_right >= params.seqlen_q - 1) params.window_right = -1;
  params.causal = params.window_left < 0 && params.window_right == 0;
}

}  // namespace flash_attention
