// flash_attention — public C++ API (no torch).
//
// Exact attention with FlashAttention-2 semantics over raw pointers, shapes and strides.
// One definition of the semantics, shared by the CPU implementation and the CUDA kernels:
//
//   q   (B, Sq, H,  D)     k, v (B, Sk, Hk, D)     H % Hk == 0 (GQA / MQA)
//   out (B, Sq, H,  D)     softmax_lse (B, H, Sq) fp32
//   varlen: q (total_q, H, D), k/v (total_k, Hk, D), int32 cu_seqlens_q/k of length B+1,
//           softmax_lse (H, total_q)
//
//   S = softmax_scale * q k^T;  softcap > 0: S = softcap * tanh(S / softcap)
//   alibi: S -= slope[b, h] * |i + Sk - Sq - j|         (bottom-right aligned distance)
//   window (left, right), -1 = unbounded; causal == window (left, 0); query row i may see key j iff
//       j <= i + Sk - Sq + right   and   j >= i + Sk - Sq - left
//   P = softmax(S) over visible keys; rows with no visible key give out = 0 and lse = +inf.
//   dropout: P_ij is kept with probability 1 - p (scaled by 1 / (1 - p)), decided by
//            flash_attention::dropout_keep(seed, offset, b, h, i, j, p) (Philox, see philox.h).
//
// FP8: dtype kFloat8E4M3 (e4m3) takes q, k, v in float8 e4m3 with optional fp32 descale factors of
// shape (B, Hk) (q_descale / k_descale / v_descale below): the kernel computes attention of
// (q * q_descale[b, h / (H / Hk)]), (k * k_descale[b, hk]), (v * v_descale[b, hk]) and writes out in
// bfloat16 (for every other dtype out has the dtype of q). Forward only, CUDA sm90 (Hopper) only,
// no varlen / dropout / alibi; everything else fails with kNotSupported naming the reason.
//
// All strides are in elements. The last dimension (head dim) must be contiguous.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "flash_attention/config.h"
#include "flash_attention/status.h"

namespace flash_attention {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat8E4M3 = 3 };
enum class Device : int { kCPU = 0, kCUDA = 1 };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

// Strides of one (B, S, H, D) tensor, in elements. For varlen tensors batch_stride is ignored
// (rows are addressed through cu_seqlens) and row_stride steps over the packed total dimension.
struct TensorStrides {
  int64_t batch = 0;
  int64_t row = 0;   // sequence
  int64_t head = 0;
};

struct ForwardParams {
  Device device = Device::kCPU;
  DType dtype = DType::kFloat16;

  // Shapes. For varlen, batch = len(cu_seqlens) - 1 and seqlen_q/k are max_seqlen_q/k.
  int batch = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  int num_heads = 0;
  int num_heads_k = 0;
  int head_dim = 0;
  int64_t total_q = 0;  // varlen only: rows of q / out / lse
  int64_t total_k = 0;  // varlen only: rows of k / v

  // Data (device pointers for kCUDA, host pointers for kCPU).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* softmax_lse = nullptr;  // required; layout fixed as documented above
  TensorStrides q_strides, k_strides, v_strides, out_strides;
  // kFloat8E4M3 only (null = 1): contiguous fp32 (batch, num_heads_k) dequantisation factors.
  const float* q_descale = nullptr;
  const float* k_descale = nullptr;
  const float* v_descale = nullptr;

  // Variable length (both set, or both null).
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  // Options.
  float softmax_scale = 0.f;  // 0 is invalid; callers pass 1/sqrt(D) by default
  bool causal = false;        // normalised by validate(): causal => window_right = 0
  int window_left = -1;
  int window_right = -1;
  float softcap = 0.f;                 // > 0 enables tanh capping
  const float* alibi_slopes = nullptr; // (H) or (B, H) fp32
  int64_t alibi_batch_stride = 0;      // 0 => one (H) vector for every batch
  float dropout_p = 0.f;               // in [0, 1)
  uint64_t philox_seed = 0;
  uint64_t philox_offset = 0;

  // Execution.
  void* stream = nullptr;  // cudaStream_t for kCUDA
  int num_threads = 0;     // CPU threads, 0 = OpenMP default
  KernelConfig config;     // CUDA kernel config; default = pick from the tuned table

  bool is_varlen() const { return cu_seqlens_q != nullptr; }
  bool has_window() const { return window_left >= 0 || window_right >= 0; }
};

struct BackwardParams : ForwardParams {
  const void* dout = nullptr;
  TensorStrides dout_strides;
  // out and softmax_lse of ForwardParams are inputs here (from the forward pass).
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  TensorStrides dq_strides, dk_strides, dv_strides;
  bool deterministic = false;
};

// Checks every field; returns kInvalidArgument naming the offending field (kNotSupported for a
// float8_e4m3 call outside what FP8 supports, see the top of this file). Normalises nothing:
// use normalize() first (it folds causal into the window and clamps windows to the sequence).
Status validate(const ForwardParams& params);
Status validate(const BackwardParams& params);
void normalize(ForwardParams& params);

// Entry points: validate, then run on params.device. Thread-safe; no global state.
Status forward(ForwardParams params);
Status backward(BackwardParams params);

// Build / capability queries.
bool cuda_built();                      // compiled with CUDA kernels
std::vector<int> cuda_archs_built();    // e.g. {80, 90}
// Why the CUDA kernels cannot serve these params (empty string = they can). Does not launch.
std::string cuda_unsupported_reason(const ForwardParams& params, int device_arch);
// Configs compiled for (arch, head_dim, dtype). Empty if none.
std::vector<KernelConfig> cuda_configs(int arch, int head_dim, DType dtype);

// Dropout mask (1 = kept) for a (B, H, Sq, Sk) block, written as uint8 to `mask` on `device`.
// Rows are padded batch rows (varlen callers index with the in-sequence position).
Status dropout_mask(Device device, uint64_t seed, uint64_t offset, float p, int batch, int heads,
                    int seqlen_q, int seqlen_k, uint8_t* mask, void* stream = nullptr);

}  // namespace flash_attention
