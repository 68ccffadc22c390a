// The PyTorch op library (_C.so): registers torch.ops.flash_attention.* once, with CPU and CUDA
// kernels. Every op checks its tensors here (messages name the argument), builds the params of the
// torch-free C++ API and maps its Status to a c10 error. Fake kernels and autograd are registered
// from Python (python/flash_attention/_ops.py).
//
// Error types seen from Python: TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_NOT_IMPLEMENTED -> NotImplementedError, anything else -> RuntimeError.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "flash_attention/flash_attention.h"
#include "flash_attention/kvcache.h"  // KV cache section

#ifdef FLASH_ATTENTION_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#ifndef FA_VERSION
#define FA_VERSION "unknown"
#endif

namespace flash_attention::torch_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------
// Small conversions
// ---------------------------------------------------------------------------------------------

void raise_if_error(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk: return;
    case StatusCode::kInvalidArgument: TORCH_CHECK_VALUE(false, "flash_attention: ", status.message());
    case StatusCode::kNotSupported: TORCH_CHECK_NOT_IMPLEMENTED(false, "flash_attention: ", status.message());
    default: TORCH_CHECK(false, "flash_attention: ", status.message());
  }
}

// float8_e4m3fn only where the caller is an FP8 entry point (fwd_fp8).
DType to_dtype(at::ScalarType type, const char* name, bool allow_fp8 = false) {
  switch (type) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kFloat8_e4m3fn:
      TORCH_CHECK_TYPE(allow_fp8, name, " is float8_e4m3fn: FP8 attention is the fwd_fp8 op (forward only)");
      return DType::kFloat8E4M3;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16 or float32 (got ", type, ")");
  }
  return DType::kFloat32;  // unreachable
}

Device to_device(const Tensor& t, const char* name) {
  if (t.is_cpu()) return Device::kCPU;
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CPU or CUDA tensor (got ", t.device(), ")");
  TORCH_CHECK_NOT_IMPLEMENTED(cuda_built(), name, " is on ", t.device(),
                              " but flash_attention was built without CUDA kernels");
  return Device::kCUDA;
}

// The kernels need a unit-stride head dim; everything else is passed as strides (no copy).
Tensor unit_last_stride(const Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// The CUDA backward moves rows in 16-byte pieces: it needs aligned data and strides that are
// multiples of 8 elements (the forward repacks by itself).
Tensor vector_friendly(const Tensor& t) {
  if (!t.is_cuda()) return t;
  bool ok = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

// (B, S, H, D) -> {batch, row, head}; varlen (total, H, D) -> {0, row, head}.
TensorStrides strides_of(const Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), t.stride(1), t.stride(2)};
  return {0, t.stride(0), t.stride(1)};
}

void check_same_device(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
                    " (all tensors must be on one device)");
}

void check_same_sizes(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), " (got ", t.sizes(), ")");
}

// ---------------------------------------------------------------------------------------------
// Shapes of q, k, v (dense or varlen) and the optional tensors
// ---------------------------------------------------------------------------------------------

struct Shape {
  bool varlen = false;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads = 0, heads_k = 0, head_dim = 0;
  int64_t total_q = 0, total_k = 0;
};

void check_cu_seqlens(const Tensor& cu, const char* name, const Tensor& q) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32 (got ", cu.scalar_type(), ")");
  check_same_device(cu, name, q);
  TORCH_CHECK_VALUE(cu.dim() == 1, name, " must be 1-D (got ", cu.dim(), "-D)");
  TORCH_CHECK_VALUE(cu.size(0) >= 2, name, " must have batch + 1 >= 2 entries (got ", cu.size(0), ")");
}

Shape check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_q,
                const OptTensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool fp8 = false) {
  const DType dt = to_dtype(q.scalar_type(), "q", fp8);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(),
                   ", got ", k.scalar_type(), ")");
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "v must have the dtype of q (", q.scalar_type(),
                   ", got ", v.scalar_type(), ")");
  (void)dt;
  to_device(q, "q");
  check_same_device(k, "k", q);
  check_same_device(v, "v", q);
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all");
  Shape s;
  s.varlen = cu_q.has_value();
  const int64_t dims = s.varlen ? 3 : 4;
  const char* layout = s.varlen ? "(total, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK_VALUE(q.dim() == dims, "q must be ", dims, "-D ", layout, " (got ", q.dim(), "-D)");
  TORCH_CHECK_VALUE(k.dim() == dims, "k must be ", dims, "-D ", layout, " (got ", k.dim(), "-D)");
  check_same_sizes(v, "v", k, "k");
  s.heads = q.size(-2);
  s.heads_k = k.size(-2);
  s.head_dim = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, "k must have the head_dim of q (", s.head_dim, ", got ",
                    k.size(-1), ")");
  TORCH_CHECK_VALUE(s.heads_k > 0 && s.heads % s.heads_k == 0, "the heads of q (", s.heads,
                    ") must be a multiple of the heads of k and v (", s.heads_k, ")");
  if (s.varlen) {
    check_cu_seqlens(*cu_q, "cu_seqlens_q", q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", q);
    TORCH_CHECK_VALUE(cu_q->size(0) == cu_k->size(0), "cu_seqlens_k must have the length of cu_seqlens_q (",
                      cu_q->size(0), ", got ", cu_k->size(0), ")");
    TORCH_CHECK_VALUE(max_seqlen_q >= 0, "max_seqlen_q must be >= 0 (got ", max_seqlen_q, ")");
    TORCH_CHECK_VALUE(max_seqlen_k >= 0, "max_seqlen_k must be >= 0 (got ", max_seqlen_k, ")");
    s.batch = cu_q->size(0) - 1;
    s.seqlen_q = max_seqlen_q;
    s.seqlen_k = max_seqlen_k;
    s.total_q = q.size(0);
    s.total_k = k.size(0);
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), ", got ",
                      k.size(0), ")");
    s.batch = q.size(0);
    s.seqlen_q = q.size(1);
    s.seqlen_k = k.size(1);
  }
  return s;
}

void check_alibi(const OptTensor& alibi, const Shape& s, const Tensor& q) {
  if (!alibi) return;
  TORCH_CHECK_TYPE(alibi->scalar_type() == at::kFloat, "alibi_slopes must be float32 (got ",
                   alibi->scalar_type(), ")");
  check_same_device(*alibi, "alibi_slopes", q);
  const bool per_head = alibi->dim() == 1 && alibi->size(0) == s.heads;
  const bool per_batch = alibi->dim() == 2 && alibi->size(0) == s.batch && alibi->size(1) == s.heads;
  TORCH_CHECK_VALUE(per_head || per_batch, "alibi_slopes must have shape (heads,) = (", s.heads,
                    ",) or (batch, heads) = (", s.batch, ", ", s.heads, ") (got ", alibi->sizes(), ")");
}

void check_options(double dropout_p, int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1) (got ", dropout_p, ")");
  TORCH_CHECK_VALUE(window_left >= -1, "window_left must be >= -1 (-1 = unbounded; got ", window_left, ")");
  TORCH_CHECK_VALUE(window_right >= -1, "window_right must be >= -1 (-1 = unbounded; got ", window_right, ")");
  TORCH_CHECK_VALUE(softcap >= 0.0, "softcap must be >= 0 (got ", softcap, ")");
}

// ---------------------------------------------------------------------------------------------
// Device plumbing: stream, device guard, dropout seeds
// ---------------------------------------------------------------------------------------------

void* current_stream(const Tensor& t) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  if (t.is_cuda()) return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
  return nullptr;
}

// Makes t's device current for the scope (CUDA only).
class DeviceScope {
 public:
  explicit DeviceScope(const Tensor& t) {
#ifdef FLASH_ATTENTION_WITH_CUDA
    if (t.is_cuda()) guard_.emplace(t.device());
#endif
  }

 private:
#ifdef FLASH_ATTENTION_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard_;
#endif
};

// Draws (seed, offset) for one dropout call from the default generator of q's device.
std::pair<uint64_t, uint64_t> draw_philox(const Tensor& q) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  if (q.is_cuda()) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
        "dropout_p > 0 is not supported under CUDA graph capture");
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(q.device().index());
    std::lock_guard<std::mutex> lock(gen.mutex());
    return at::check_generator<at::CUDAGeneratorImpl>(gen)->philox_engine_inputs(4);
  }
#endif
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return {at::check_generator<at::CPUGeneratorImpl>(gen)->random64(), 0};
}

Tensor make_rng_state(uint64_t seed, uint64_t offset) {
  Tensor state = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  int64_t* data = state.data_ptr<int64_t>();  // direct writes: no indexing ops on every call
  data[0] = static_cast<int64_t>(seed);
  data[1] = static_cast<int64_t>(offset);
  return state;
}

std::pair<uint64_t, uint64_t> read_rng_state(const Tensor& state) {
  TORCH_CHECK_VALUE(state.is_cpu() && state.scalar_type() == at::kLong && state.numel() == 2,
                    "rng_state must be the int64 CPU tensor [seed, offset] returned by fwd (got ",
                    state.scalar_type(), " ", state.sizes(), " on ", state.device(), ")");
  const Tensor c = state.contiguous();
  return {static_cast<uint64_t>(c.data_ptr<int64_t>()[0]), static_cast<uint64_t>(c.data_ptr<int64_t>()[1])};
}

// ---------------------------------------------------------------------------------------------
// Params
// ---------------------------------------------------------------------------------------------

struct Options {
  double dropout_p = 0, softmax_scale = 0, softcap = 0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  std::string config;
};

void fill_params(ForwardParams& p, const Tensor& q, const Tensor& k, const Tensor& v, const Shape& s,
                 const OptTensor& cu_q, const OptTensor& cu_k, const OptTensor& alibi, const Options& o) {
  p.device = to_device(q, "q");
  p.dtype = to_dtype(q.scalar_type(), "q", true);  // checked by check_qkv
  p.batch = static_cast<int>(s.batch);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.num_heads = static_cast<int>(s.heads);
  p.num_heads_k = static_cast<int>(s.heads_k);
  p.head_dim = static_cast<int>(s.head_dim);
  p.total_q = s.total_q;
  p.total_k = s.total_k;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  if (cu_q) {
    p.cu_seqlens_q = cu_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->data_ptr<int32_t>();
  }
  p.softmax_scale = static_cast<float>(o.softmax_scale);
  p.causal = o.causal;
  p.window_left = static_cast<int>(o.window_left);
  p.window_right = static_cast<int>(o.window_right);
  p.softcap = static_cast<float>(o.softcap);
  if (alibi) {
    p.alibi_slopes = alibi->data_ptr<float>();
    p.alibi_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
  }
  p.dropout_p = static_cast<float>(o.dropout_p);
  p.stream = current_stream(q);
  p.num_threads = at::get_num_threads();
  raise_if_error(KernelConfig::parse(o.config, &p.config));
}

OptTensor contiguous_opt(const OptTensor& t) {
  if (!t) return t;
  return t->contiguous();
}

// Batches or sequences with no rows: nothing to compute (the core requires >= 1 of each).
bool is_empty(const Shape& s) {
  if (s.varlen) return s.total_q == 0;
  return s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0;
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                       const OptTensor& cu_q_in, const OptTensor& cu_k_in,
                                       int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
                                       double softmax_scale, bool causal, int64_t window_left,
                                       int64_t window_right, double softcap, const OptTensor& alibi_in,
                                       c10::string_view config, bool deterministic) {
  (void)deterministic;  // read by autograd for bwd
  const Shape s = check_qkv(q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q, max_seqlen_k);
  check_alibi(alibi_in, s, q_in);
  check_options(dropout_p, window_left, window_right, softcap);
  DeviceScope scope(q_in);

  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const OptTensor cu_q = contiguous_opt(cu_q_in), cu_k = contiguous_opt(cu_k_in), alibi = contiguous_opt(alibi_in);
  Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_sizes = s.varlen ? std::vector<int64_t>{s.heads, s.total_q}
                                  : std::vector<int64_t>{s.batch, s.heads, s.seqlen_q};
  Tensor lse = at::empty(lse_sizes, q.options().dtype(at::kFloat));
  const auto [seed, offset] = dropout_p > 0 ? draw_philox(q) : std::pair<uint64_t, uint64_t>{0, 0};
  Tensor rng_state = make_rng_state(seed, offset);
  if (is_empty(s) || (!s.varlen && s.seqlen_k == 0)) {
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse, rng_state};
  }

  ForwardParams p;
  const Options o{dropout_p, softmax_scale, softcap, causal, window_left, window_right, std::string(config)};
  fill_params(p, q, k, v, s, cu_q, cu_k, alibi, o);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.softmax_lse = lse.data_ptr<float>();
  p.philox_seed = seed;
  p.philox_offset = offset;
  raise_if_error(forward(p));
  return {out, lse, rng_state};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                       const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                       const OptTensor& cu_q_in, const OptTensor& cu_k_in,
                                       int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
                                       double softmax_scale, bool causal, int64_t window_left,
                                       int64_t window_right, double softcap, const OptTensor& alibi_in,
                                       bool deterministic, const Tensor& rng_state) {
  const Shape s = check_qkv(q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q, max_seqlen_k);
  check_alibi(alibi_in, s, q_in);
  check_options(dropout_p, window_left, window_right, softcap);
  check_same_sizes(dout_in, "dout", q_in, "q");
  check_same_sizes(out_in, "out", q_in, "q");
  check_same_device(dout_in, "dout", q_in);
  check_same_device(out_in, "out", q_in);
  check_same_device(lse_in, "softmax_lse", q_in);
  TORCH_CHECK_TYPE(dout_in.scalar_type() == q_in.scalar_type(), "dout must have the dtype of q");
  TORCH_CHECK_TYPE(out_in.scalar_type() == q_in.scalar_type(), "out must have the dtype of q");
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, "softmax_lse must be float32");
  const auto lse_sizes = s.varlen ? std::vector<int64_t>{s.heads, s.total_q}
                                  : std::vector<int64_t>{s.batch, s.heads, s.seqlen_q};
  TORCH_CHECK_VALUE(lse_in.sizes() == at::IntArrayRef(lse_sizes), "softmax_lse must have shape ",
                    at::IntArrayRef(lse_sizes), " (got ", lse_in.sizes(), ")");
  const auto [seed, offset] = read_rng_state(rng_state);
  DeviceScope scope(q_in);

  const Tensor q = vector_friendly(unit_last_stride(q_in)), k = vector_friendly(unit_last_stride(k_in));
  const Tensor v = vector_friendly(unit_last_stride(v_in)), out = vector_friendly(unit_last_stride(out_in));
  const Tensor dout = vector_friendly(unit_last_stride(dout_in)), lse = lse_in.contiguous();
  const OptTensor cu_q = contiguous_opt(cu_q_in), cu_k = contiguous_opt(cu_k_in), alibi = contiguous_opt(alibi_in);
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (is_empty(s) || (!s.varlen && s.seqlen_k == 0)) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }

  BackwardParams p;
  const Options o{dropout_p, softmax_scale, softcap, causal, window_left, window_right, ""};
  fill_params(p, q, k, v, s, cu_q, cu_k, alibi, o);
  p.out = const_cast<void*>(out.const_data_ptr());
  p.out_strides = strides_of(out);
  p.softmax_lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.philox_seed = seed;
  p.philox_offset = offset;
  p.dout = dout.const_data_ptr();
  p.dout_strides = strides_of(dout);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_strides = strides_of(dq);
  p.dk_strides = strides_of(dk);
  p.dv_strides = strides_of(dv);
  p.deterministic = deterministic;
  raise_if_error(backward(p));
  return {dq, dk, dv};
}

// FP8 forward: q, k, v float8_e4m3fn (batch, seqlen, heads, head_dim); q/k/v_descale fp32
// (batch, heads_k) or None (= 1). Returns out in bfloat16 and softmax_lse (batch, heads, seqlen_q).
// Forward only: the autograd formula registered in _ops.py raises.
void check_descale(const OptTensor& t, const char* name, const Shape& s, const Tensor& q) {
  if (!t) return;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32 (got ", t->scalar_type(), ")");
  check_same_device(*t, name, q);
  TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == s.batch && t->size(1) == s.heads_k, name,
                    " must have shape (batch, nheads_k) = (", s.batch, ", ", s.heads_k, ") (got ", t->sizes(), ")");
}

std::tuple<Tensor, Tensor> fwd_fp8(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                   const OptTensor& q_descale_in, const OptTensor& k_descale_in,
                                   const OptTensor& v_descale_in, double softmax_scale, bool causal,
                                   int64_t window_left, int64_t window_right, double softcap,
                                   c10::string_view config) {
  TORCH_CHECK_TYPE(q_in.scalar_type() == at::kFloat8_e4m3fn, "q must be float8_e4m3fn (got ", q_in.scalar_type(), ")");
  const Shape s = check_qkv(q_in, k_in, v_in, std::nullopt, std::nullopt, 0, 0, /*fp8=*/true);
  check_descale(q_descale_in, "q_descale", s, q_in);
  check_descale(k_descale_in, "k_descale", s, q_in);
  check_descale(v_descale_in, "v_descale", s, q_in);
  check_options(0.0, window_left, window_right, softcap);
  DeviceScope scope(q_in);

  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const OptTensor q_descale = contiguous_opt(q_descale_in), k_descale = contiguous_opt(k_descale_in);
  const OptTensor v_descale = contiguous_opt(v_descale_in);
  Tensor out = at::empty(q.sizes(), q.options().dtype(at::kBFloat16));
  Tensor lse = at::empty({s.batch, s.heads, s.seqlen_q}, q.options().dtype(at::kFloat));
  if (is_empty(s)) {
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  ForwardParams p;
  const Options o{0.0, softmax_scale, softcap, causal, window_left, window_right, std::string(config)};
  fill_params(p, q, k, v, s, std::nullopt, std::nullopt, std::nullopt, o);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.softmax_lse = lse.data_ptr<float>();
  p.q_descale = q_descale ? q_descale->data_ptr<float>() : nullptr;
  p.k_descale = k_descale ? k_descale->data_ptr<float>() : nullptr;
  p.v_descale = v_descale ? v_descale->data_ptr<float>() : nullptr;
  raise_if_error(forward(p));
  return {out, lse};
}

Tensor dropout_mask_op(const Tensor& rng_state, double p, int64_t batch, int64_t heads, int64_t seqlen_q,
                       int64_t seqlen_k, at::Device device) {
  const auto [seed, offset] = read_rng_state(rng_state);
  Tensor mask = at::empty({batch, heads, seqlen_q, seqlen_k}, at::TensorOptions().dtype(at::kByte).device(device));
  const Device dev = to_device(mask, "device");
  DeviceScope scope(mask);
  raise_if_error(dropout_mask(dev, seed, offset, static_cast<float>(p), static_cast<int>(batch),
                              static_cast<int>(heads), static_cast<int>(seqlen_q), static_cast<int>(seqlen_k),
                              mask.data_ptr<uint8_t>(), current_stream(mask)));
  return mask;
}

// =============================================================================================
// KV cache (flash_attn_with_kvcache, paged / varlen decode) and flash_attn_combine.
// Section owned by the kvcache engineer: fwd_kvcache, fwd_combine.
// =============================================================================================

void check_index_tensor(const OptTensor& t, const char* name, const Tensor& q, int64_t batch) {
  if (!t) return;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, " must be int32 (got ", t->scalar_type(), ")");
  check_same_device(*t, name, q);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == batch, name, " must have shape (batch,) = (", batch,
                    ",) (got ", t->sizes(), ")");
}

void check_cache_tensor(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
                   ", got ", t.scalar_type(), ")");
  check_same_device(t, name, q);
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (batch_cache, seqlen_cache, heads_k, head_dim) or paged "
                    "(num_blocks, page_size, heads_k, head_dim) (got ", t.dim(), "-D)");
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must have a unit-stride last dimension (it is updated in place)");
}

// Shapes of q (dense or varlen), the caches, the new k / v, and the index tensors.
void fill_kvcache_shapes(KVCacheParams& p, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                         const OptTensor& cu_q, int64_t max_seqlen_q) {
  p.device = to_device(q, "q");
  p.dtype = to_dtype(q.scalar_type(), "q");
  check_cache_tensor(k_cache, "k_cache", q);
  check_cache_tensor(v_cache, "v_cache", q);
  check_same_sizes(v_cache, "v_cache", k_cache, "k_cache");
  if (cu_q) {
    check_cu_seqlens(*cu_q, "cu_seqlens_q", q);
    TORCH_CHECK_VALUE(q.dim() == 3, "q must be 3-D (total_q, heads, head_dim) with cu_seqlens_q (got ", q.dim(), "-D)");
    p.batch = static_cast<int>(cu_q->size(0) - 1);
    p.seqlen_q = static_cast<int>(max_seqlen_q);
    p.total_q = q.size(0);
  } else {
    TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D (batch, seqlen, heads, head_dim) (got ", q.dim(), "-D)");
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(1));
  }
  p.num_heads = static_cast<int>(q.size(-2));
  p.head_dim = static_cast<int>(q.size(-1));
  p.num_heads_k = static_cast<int>(k_cache.size(2));
  TORCH_CHECK_VALUE(k_cache.size(3) == p.head_dim, "k_cache must have the head_dim of q (", p.head_dim, ", got ",
                    k_cache.size(3), ")");
  p.cache_batch = static_cast<int>(k_cache.size(0));
  p.cache_seqlen = static_cast<int>(k_cache.size(1));
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_cache_strides = strides_of(k_cache);
  p.v_cache_strides = strides_of(v_cache);
  p.q = q.data_ptr();
  p.q_strides = strides_of(q);
  if (cu_q) p.cu_seqlens_q = cu_q->data_ptr<int32_t>();
}

void fill_new_kv(KVCacheParams& p, const Tensor& q, const OptTensor& k, const OptTensor& v) {
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together (new keys / values to append)");
  if (!k) return;
  for (const auto& [t, name] : {std::pair{*k, "k"}, std::pair{*v, "v"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q");
    check_same_device(t, name, q);
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == p.batch && t.size(2) == p.num_heads_k && t.size(3) == p.head_dim,
                      name, " must have shape (batch, seqlen_new, heads_k, head_dim) = (", p.batch, ", *, ",
                      p.num_heads_k, ", ", p.head_dim, ") (got ", t.sizes(), ")");
  }
  check_same_sizes(*v, "v", *k, "k");
  p.k_new = k->data_ptr();
  p.v_new = v->data_ptr();
  p.k_new_strides = strides_of(*k);
  p.v_new_strides = strides_of(*v);
  p.seqlen_new = static_cast<int>(k->size(1));
}

void fill_rotary(KVCacheParams& p, const Tensor& q, const OptTensor& cos, const OptTensor& sin, bool interleaved) {
  TORCH_CHECK_VALUE(cos.has_value() == sin.has_value(), "rotary_cos and rotary_sin must be given together");
  if (!cos) return;
  for (const auto& [t, name] : {std::pair{*cos, "rotary_cos"}, std::pair{*sin, "rotary_sin"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
                     ", got ", t.scalar_type(), ")");
    check_same_device(t, name, q);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(-1) == 1, name, " must be 2-D (seqlen_rotary, rotary_dim / 2) with "
                      "a unit-stride last dimension (got ", t.sizes(), ")");
  }
  check_same_sizes(*sin, "rotary_sin", *cos, "rotary_cos");
  p.rotary_cos = cos->data_ptr();
  p.rotary_sin = sin->data_ptr();
  p.rotary_cos_stride = cos->stride(0);
  p.rotary_sin_stride = sin->stride(0);
  p.seqlen_rotary = static_cast<int>(cos->size(0));
  p.rotary_dim = static_cast<int>(2 * cos->size(1));
  p.rotary_interleaved = interleaved;
}

void fill_kvcache_indices(KVCacheParams& p, const Tensor& q, const OptTensor& seqlens, const OptTensor& batch_idx,
                          const OptTensor& leftpad, const OptTensor& block_table) {
  check_index_tensor(seqlens, "cache_seqlens", q, p.batch);
  check_index_tensor(batch_idx, "cache_batch_idx", q, p.batch);
  check_index_tensor(leftpad, "cache_leftpad", q, p.batch);
  if (seqlens) p.cache_seqlens = seqlens->data_ptr<int32_t>();
  if (batch_idx) p.cache_batch_idx = batch_idx->data_ptr<int32_t>();
  if (leftpad) p.cache_leftpad = leftpad->data_ptr<int32_t>();
  if (!block_table) return;
  TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, "block_table must be int32 (got ",
                   block_table->scalar_type(), ")");
  check_same_device(*block_table, "block_table", q);
  TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == p.batch && block_table->stride(1) == 1,
                    "block_table must have shape (batch, max_blocks_per_seq) = (", p.batch,
                    ", *) with unit-stride rows (got ", block_table->sizes(), ")");
  p.block_table = block_table->data_ptr<int32_t>();
  p.block_table_stride = block_table->stride(0);
  p.max_blocks_per_seq = static_cast<int>(block_table->size(1));
}

bool capturing_graph(const Tensor& q) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  if (q.is_cuda()) return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#endif
  return false;
}

std::tuple<Tensor, Tensor> fwd_kvcache(
    const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache, const OptTensor& k_in, const OptTensor& v_in,
    const OptTensor& rotary_cos, const OptTensor& rotary_sin, const OptTensor& cache_seqlens,
    const OptTensor& cache_batch_idx, const OptTensor& cache_leftpad, const OptTensor& block_table,
    const OptTensor& cu_seqlens_q, int64_t max_seqlen_q, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, bool rotary_interleaved, const OptTensor& alibi_in, int64_t num_splits,
    bool check_indices) {
  to_dtype(q_in.scalar_type(), "q");
  to_device(q_in, "q");
  DeviceScope scope(q_in);
  const Tensor q = unit_last_stride(q_in);
  const OptTensor k = k_in ? OptTensor(unit_last_stride(*k_in)) : k_in, v = v_in ? OptTensor(unit_last_stride(*v_in)) : v_in;
  const OptTensor cos = contiguous_opt(rotary_cos), sin = contiguous_opt(rotary_sin);
  const OptTensor seqlens = contiguous_opt(cache_seqlens), batch_idx = contiguous_opt(cache_batch_idx);
  const OptTensor leftpad = contiguous_opt(cache_leftpad), table = contiguous_opt(block_table);
  const OptTensor cu_q = contiguous_opt(cu_seqlens_q), alibi = contiguous_opt(alibi_in);

  KVCacheParams p;
  fill_kvcache_shapes(p, q, k_cache, v_cache, cu_q, max_seqlen_q);
  fill_new_kv(p, q, k, v);
  fill_rotary(p, q, cos, sin, rotary_interleaved);
  fill_kvcache_indices(p, q, seqlens, batch_idx, leftpad, table);
  Shape s;
  s.batch = p.batch;
  s.heads = p.num_heads;
  check_alibi(alibi, s, q);
  if (alibi) {
    p.alibi_slopes = alibi->data_ptr<float>();
    p.alibi_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
  }
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  p.softcap = static_cast<float>(softcap);
  p.num_splits = static_cast<int>(num_splits);
  p.check_indices = check_indices && !capturing_graph(q);
  p.stream = current_stream(q);
  p.num_threads = at::get_num_threads();

  Tensor out = at::empty(q.sizes(), q.options());
  const auto lse_sizes = cu_q ? std::vector<int64_t>{p.num_heads, p.total_q}
                              : std::vector<int64_t>{p.batch, p.num_heads, p.seqlen_q};
  Tensor lse = at::empty(lse_sizes, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.softmax_lse = lse.data_ptr<float>();
  Tensor workspace;
  if (const std::size_t bytes = kvcache_workspace_size(p)) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = bytes;
  }
  raise_if_error(kvcache_forward(p));
  return {out, lse};
}

// out_partial (splits, B, S, H, D) fp32, lse_partial (splits, B, S, H) fp32 -> out (B, S, H, D),
// lse (B, S, H) (a view of (B, H, S) storage, as FlashAttention-3 returns it).
std::tuple<Tensor, Tensor> fwd_combine(const Tensor& out_partial, const Tensor& lse_partial,
                                       std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_TYPE(out_partial.scalar_type() == at::kFloat, "out_partial must be float32 (got ",
                   out_partial.scalar_type(), ")");
  TORCH_CHECK_TYPE(lse_partial.scalar_type() == at::kFloat, "lse_partial must be float32 (got ",
                   lse_partial.scalar_type(), ")");
  TORCH_CHECK_VALUE(out_partial.dim() == 5, "out_partial must be 5-D (num_splits, batch, seqlen, heads, head_dim) "
                    "(got ", out_partial.dim(), "-D)");
  TORCH_CHECK_VALUE(lse_partial.dim() == 4 && lse_partial.sizes() == out_partial.sizes().slice(0, 4),
                    "lse_partial must have shape (num_splits, batch, seqlen, heads) = ",
                    out_partial.sizes().slice(0, 4), " (got ", lse_partial.sizes(), ")");
  check_same_device(lse_partial, "lse_partial", out_partial);
  CombineParams p;
  p.device = to_device(out_partial, "out_partial");
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  p.out_dtype = to_dtype(dtype, "out_dtype");
  DeviceScope scope(out_partial);
  const Tensor op = unit_last_stride(out_partial);
  p.num_splits = static_cast<int>(op.size(0));
  p.batch = static_cast<int>(op.size(1));
  p.seqlen = static_cast<int>(op.size(2));
  p.num_heads = static_cast<int>(op.size(3));
  p.head_dim = static_cast<int>(op.size(4));
  Tensor out = at::empty({p.batch, p.seqlen, p.num_heads, p.head_dim}, op.options().dtype(dtype));
  Tensor lse = at::empty({p.batch, p.num_heads, p.seqlen}, op.options());
  if (out.numel() == 0) return {out, lse.transpose(1, 2)};
  p.out_partial = op.data_ptr<float>();
  p.out_partial_split_stride = op.stride(0);
  p.out_partial_strides = {op.stride(1), op.stride(2), op.stride(3)};
  p.lse_partial = lse_partial.data_ptr<float>();
  p.lse_split_stride = lse_partial.stride(0);
  p.lse_batch_stride = lse_partial.stride(1);
  p.lse_row_stride = lse_partial.stride(2);
  p.lse_head_stride = lse_partial.stride(3);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.softmax_lse = lse.data_ptr<float>();
  p.stream = current_stream(out);
  raise_if_error(combine(p));
  return {out, lse.transpose(1, 2)};
}

// =============================================================================================
// (end of the KV cache section)
// =============================================================================================

// ---------------------------------------------------------------------------------------------
// Queries (no tensors): build info, and whether the CUDA kernels serve a call
// ---------------------------------------------------------------------------------------------

// Compute capability of a GPU (e.g. 90); 0 when there is no such device (the kernels then decline).
int device_arch(int64_t device_index) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  if (device_index < 0 || device_index >= at::cuda::device_count()) return 0;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device_index));
  return prop->major * 10 + prop->minor;
#else
  (void)device_index;
  return 0;
#endif
}

// Describes the call with contiguous tensors at aligned (never dereferenced) addresses.
std::string cuda_unsupported_reason_op(int64_t device_index, at::ScalarType dtype, int64_t batch,
                                       int64_t seqlen_q, int64_t seqlen_k, int64_t heads, int64_t heads_k,
                                       int64_t head_dim, bool varlen, double dropout_p, bool causal,
                                       int64_t window_left, int64_t window_right, double softcap,
                                       int64_t alibi_dims, c10::string_view config) {
  if (!cuda_built()) return "flash_attention was built without CUDA kernels";
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat && dtype != at::kFloat8_e4m3fn) {
    return "unsupported dtype";
  }
  alignas(256) static const char kSomewhere[256] = {};
  static const int32_t kNoSeqlens[1] = {0};
  ForwardParams p;
  p.device = Device::kCUDA;
  p.dtype = to_dtype(dtype, "dtype", true);
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.num_heads = static_cast<int>(heads);
  p.num_heads_k = static_cast<int>(heads_k);
  p.head_dim = static_cast<int>(head_dim);
  p.q = p.k = p.v = p.out = const_cast<char*>(kSomewhere);
  p.softmax_lse = reinterpret_cast<float*>(const_cast<char*>(kSomewhere));
  p.q_strides = p.out_strides = {seqlen_q * heads * head_dim, heads * head_dim, head_dim};
  p.k_strides = p.v_strides = {seqlen_k * heads_k * head_dim, heads_k * head_dim, head_dim};
  if (varlen) {
    p.cu_seqlens_q = p.cu_seqlens_k = kNoSeqlens;
    p.total_q = batch * seqlen_q;
    p.total_k = batch * seqlen_k;
  }
  p.softmax_scale = 1.f;
  p.dropout_p = static_cast<float>(dropout_p);
  p.causal = causal;
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  p.softcap = static_cast<float>(softcap);
  if (alibi_dims > 0) p.alibi_slopes = reinterpret_cast<const float*>(kSomewhere);
  if (alibi_dims == 2) p.alibi_batch_stride = heads;
  const Status parsed = KernelConfig::parse(std::string(config), &p.config);
  if (!parsed.ok()) return parsed.message();
  return cuda_unsupported_reason(p, device_arch(device_index));
}

// JSON built with plain string appends (no iostreams needed for three short lists).
std::string json_item(int v) { return std::to_string(v); }
std::string json_item(const std::string& v) { return "\"" + v + "\""; }

template <typename T>
std::string json_list(const std::vector<T>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + json_item(items[i]);
  return out + "]";
}

std::vector<int> head_dims_built() {
#if defined(FLASH_ATTENTION_WITH_CUDA) && defined(FA_HEADDIMS_BUILT)
  return {FA_HEADDIMS_BUILT};
#else
  return {};
#endif
}

std::vector<std::string> dtypes_built() {
  std::vector<std::string> out;
#if defined(FLASH_ATTENTION_WITH_CUDA) && defined(FA_DTYPES_BUILT)
  const std::string all = FA_DTYPES_BUILT;
  std::size_t start = 0;
  while (start < all.size()) {
    std::size_t end = all.find(',', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) out.push_back(all.substr(start, end - start));
    start = end + 1;
  }
#endif
  return out;
}

std::string build_info() {
  return std::string("{\"version\": \"") + FA_VERSION + "\", \"cuda_built\": " +
         (cuda_built() ? "true" : "false") + ", \"archs\": " + json_list(cuda_archs_built()) +
         ", \"head_dims\": " + json_list(head_dims_built()) + ", \"dtypes\": " +
         json_list(dtypes_built()) + "}";
}

}  // namespace
}  // namespace flash_attention::torch_ops

TORCH_LIBRARY(flash_attention, m) {
  namespace ops = flash_attention::torch_ops;
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p, float softmax_scale, bool causal, "
      "int window_left, int window_right, float softcap, Tensor? alibi_slopes, str config=\"\", "
      "bool deterministic=False) -> (Tensor out, Tensor softmax_lse, Tensor rng_state)");
  m.def(
      "fwd_fp8(Tensor q, Tensor k, Tensor v, Tensor? q_descale, Tensor? k_descale, Tensor? v_descale, "
      "float softmax_scale, bool causal, int window_left, int window_right, float softcap, str config=\"\") "
      "-> (Tensor out, Tensor softmax_lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "float dropout_p, float softmax_scale, bool causal, int window_left, int window_right, "
      "float softcap, Tensor? alibi_slopes, bool deterministic, Tensor rng_state) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "dropout_mask(Tensor rng_state, float p, int batch, int heads, int seqlen_q, int seqlen_k, "
      "Device device) -> Tensor");
  // KV cache section (fwd_kvcache, fwd_combine)
  m.def(
      "fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor? rotary_cos, "
      "Tensor? rotary_sin, Tensor? cache_seqlens, Tensor? cache_batch_idx, Tensor? cache_leftpad, "
      "Tensor? block_table, Tensor? cu_seqlens_q, SymInt max_seqlen_q, float softmax_scale, bool causal, "
      "int window_left, int window_right, float softcap, bool rotary_interleaved, Tensor? alibi_slopes, "
      "int num_splits, bool check_indices=True) -> (Tensor out, Tensor softmax_lse)");
  m.def("fwd_combine(Tensor out_partial, Tensor lse_partial, ScalarType? out_dtype=None) -> (Tensor out, Tensor softmax_lse)");
  // (end of the KV cache section)
  m.def("build_info() -> str", &ops::build_info);
  m.def(
      "cuda_unsupported_reason(int device_index, ScalarType dtype, int batch, int seqlen_q, int seqlen_k, "
      "int heads, int heads_k, int head_dim, bool varlen, float dropout_p, bool causal, int window_left, "
      "int window_right, float softcap, int alibi_dims, str config=\"\") -> str",
      &ops::cuda_unsupported_reason_op);
}

// One implementation serves both devices; device specifics (guard, stream, generator) are inside.
// Without CUDA kernels the CUDA entries raise NotImplementedError naming the tensor.
TORCH_LIBRARY_IMPL(flash_attention, CPU, m) {
  namespace ops = flash_attention::torch_ops;
  m.impl("fwd", &ops::fwd);
  m.impl("fwd_fp8", &ops::fwd_fp8);
  m.impl("bwd", &ops::bwd);
  m.impl("dropout_mask", &ops::dropout_mask_op);
  m.impl("fwd_kvcache", &ops::fwd_kvcache);  // KV cache section
  m.impl("fwd_combine", &ops::fwd_combine);  // KV cache section
}

TORCH_LIBRARY_IMPL(flash_attention, CUDA, m) {
  namespace ops = flash_attention::torch_ops;
  m.impl("fwd_kvcache", &ops::fwd_kvcache);  // KV cache section
  m.impl("fwd_combine", &ops::fwd_combine);  // KV cache section
  m.impl("fwd", &ops::fwd);
  m.impl("fwd_fp8", &ops::fwd_fp8);
  m.impl("bwd", &ops::bwd);
}
