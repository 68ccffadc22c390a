// The sm90 door (cuda/sm90/sm90_api.h): what the Hopper kernels serve, and the dispatch to the
// per-(head dim, dtype) kernels compiled into this build.
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "cuda/sm90/bwd_dispatch.h"
#include "cuda/sm90/fwd_dispatch.h"
#include "cuda/sm90/sm90_api.h"

namespace flash_attention::sm90 {
namespace {

bool is_fp8(DType dtype) { return dtype == DType::kFloat8E4M3; }

// The kernel head dim serving `head_dim`: the smallest built tile head dim >= it (padding), or 0.
int kernel_head_dim(int head_dim, DType dtype) {
  int best = 0;
  for (const FwdTilePair& t : fwd_tile_table(is_fp8(dtype))) {
    const int d = t.dense.head_dim;
    if (d >= head_dim && headdim_built(d) && (best == 0 || d < best)) best = d;
  }
  return best;
}

const FwdTilePair* tiles_of(int kernel_hdim, DType dtype) {
  for (const FwdTilePair& t : fwd_tile_table(is_fp8(dtype))) {
    if (t.dense.head_dim == kernel_hdim) return &t;
  }
  return nullptr;
}

KernelConfig to_config(const FwdTile& t) {
  KernelConfig c;
  c.path = KernelPath::kSm90;
  c.block_m = t.block_m;
  c.block_n = t.block_n;
  c.num_warps = fwd_num_warps(t);
  c.stages = t.stages;
  return c;
}

std::string describe(const KernelConfig& c) {
  return "sm90:m" + std::to_string(c.block_m) + "n" + std::to_string(c.block_n) + "w" +
         std::to_string(c.num_warps) + "s" + std::to_string(c.stages) + (c.q_in_regs ? "q" : "");
}

bool is_local(const ForwardParams& p) { return p.window_left >= 0 || p.window_right >= 0; }

// The tile params.config asks for (auto: the default for causal/local or dense); "" or a reason.
std::string pick_tile(const ForwardParams& p, FwdTile* out) {
  const FwdTilePair* tiles = tiles_of(kernel_head_dim(p.head_dim, p.dtype), p.dtype);
  if (tiles == nullptr) {
    return "sm90: no " + std::string(dtype_name(p.dtype)) + " kernel built for head_dim " + std::to_string(p.head_dim);
  }
  const KernelConfig& want = p.config;
  if (want.is_auto()) {
    const bool long_causal = p.window_left < 0 && tiles->causal_long_keys > 0 && p.seqlen_k > tiles->causal_long_keys;
    const bool local = is_local(p) ? !long_causal : p.seqlen_k <= tiles->dense_short_keys;
    *out = local ? tiles->local : tiles->dense;
    return "";
  }
  if (want.path != KernelPath::kSm90) return "config does not ask for the sm90 path";
  for (const FwdTile& t : {tiles->dense, tiles->local}) {
    if (to_config(t) == want) {
      *out = t;
      return "";
    }
  }
  return "config " + describe(want) + " is not built for head_dim " + std::to_string(p.head_dim) +
         " (built: " + describe(to_config(tiles->dense)) + ", " + describe(to_config(tiles->local)) + ")";
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// TMA and the 16-byte epilogue need every stride of a mode with extent > 1 to be 16 bytes apart:
// a multiple of `elems` (8 for 16-bit tensors, 16 for e4m3 ones).
std::string stride_reason(const char* name, const TensorStrides& s, const ForwardParams& p, int heads,
                          int elems) {
  const bool batch_used = !p.is_varlen() && p.batch > 1;
  const std::string multiple = " stride is not a multiple of " + std::to_string(elems) + " elements";
  if (s.row % elems != 0) return name + std::string(" row") + multiple;
  if (heads > 1 && s.head % elems != 0) return name + std::string(" head") + multiple;
  if (batch_used && s.batch % elems != 0) return name + std::string(" batch") + multiple;
  return "";
}

// e4m3 kernels exist for the head dims of kFwdTilesFp8 only.
constexpr bool fp8_kernel(int head_dim) {
  for (const FwdTilePair& t : kFwdTilesFp8) {
    if (t.dense.head_dim == head_dim) return true;
  }
  return false;
}

template <int kHeadDim>
Status run_if_built(const ForwardParams& p, const FwdTile& tile, bool* ran) {
  if constexpr (headdim_built(kHeadDim)) {
    if (tile.head_dim == kHeadDim) {
      *ran = true;
      if constexpr (fp8_kernel(kHeadDim)) {
        if (is_fp8(p.dtype)) return run_fwd<kHeadDim, DType::kFloat8E4M3>(p, tile);
      }
      return dispatch_dtype(p.dtype, [&](auto dt) -> Status {
        if constexpr (dtype_built(decltype(dt)::value)) {
          return run_fwd<kHeadDim, decltype(dt)::value>(p, tile);
        } else {
          return Status::NotSupported(std::string("sm90: dtype ") + dtype_name(p.dtype) + " is not built");
        }
      });
    }
  }
  return Status::Ok();
}

// What FP8 needs beyond the rest: dense inputs, head_dim % 16 (16-byte TMA rows of e4m3).
std::string fp8_reason(const ForwardParams& p) {
  if (p.is_varlen()) return "sm90 path: float8_e4m3 does not support varlen (cu_seqlens)";
  if (p.head_dim % 16 != 0) {
    return "sm90 path: float8_e4m3 needs head_dim % 16 == 0 (got " + std::to_string(p.head_dim) + ")";
  }
  return "";
}

}  // namespace

std::string unsupported_reason(const ForwardParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16 && !is_fp8(p.dtype)) {
    return std::string("sm90 path: dtype ") + dtype_name(p.dtype) + " is not supported (fp16/bf16/float8_e4m3 only)";
  }
  if (!is_fp8(p.dtype) && !dtype_built(p.dtype)) {
    return std::string("sm90 path: dtype ") + dtype_name(p.dtype) + " is not built";
  }
  if (p.head_dim % 8 != 0 || p.head_dim > 256) {
    return "sm90 path: head_dim must be a multiple of 8 and <= 256 (got " + std::to_string(p.head_dim) + ")";
  }
  if (is_fp8(p.dtype)) {
    std::string why = fp8_reason(p);
    if (!why.empty()) return why;
  }
  if (p.alibi_slopes != nullptr) return "sm90 path: alibi_slopes are served by the sm80 path";
  if (p.dropout_p > 0.f) return "sm90 path: dropout is served by the sm80 path";
  if (!(p.softmax_scale > 0.f)) return "sm90 path: softmax_scale must be > 0";
  if (p.batch > 65535 || p.num_heads > 65535) return "sm90 path: batch and num_heads must be <= 65535";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out)) {
    return "sm90 path: q, k, v and out must be 16-byte aligned";
  }
  struct Operand {
    const char* name;
    const TensorStrides& strides;
    int heads;
  };
  const int in_elems = 16 / int(dtype_size(p.dtype));  // out is 16-bit (bf16 for e4m3 inputs)
  for (const Operand& o : {Operand{"q", p.q_strides, p.num_heads}, Operand{"k", p.k_strides, p.num_heads_k},
                           Operand{"v", p.v_strides, p.num_heads_k}, Operand{"out", p.out_strides, p.num_heads}}) {
    std::string r = stride_reason(o.name, o.strides, p, o.heads, o.name == std::string("out") ? 8 : in_elems);
    if (!r.empty()) return "sm90 path: " + r;
  }
  FwdTile tile;
  return pick_tile(p, &tile);
}

Status forward(const ForwardParams& p) {
  std::string reason = unsupported_reason(p);
  if (!reason.empty()) return Status::NotSupported(reason);
  FwdTile tile;
  pick_tile(p, &tile);
  bool ran = false;
  Status st = run_if_built<64>(p, tile, &ran);
  if (!ran) st = run_if_built<96>(p, tile, &ran);
  if (!ran) st = run_if_built<128>(p, tile, &ran);
  if (!ran) st = run_if_built<192>(p, tile, &ran);
  if (!ran) st = run_if_built<256>(p, tile, &ran);
  if (!ran) return Status::Internal("sm90: no kernel for head_dim " + std::to_string(p.head_dim));
  return st;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
namespace {

// The sm90 backward kernel serving `head_dim`: the head-dim specialisation the build would use,
// when it is one of kBwdHeadDims; else 0.
int bwd_kernel_head_dim(int head_dim) {
  const int spec = headdim_specialisation(head_dim);
  for (int d : kBwdHeadDims) {
    if (d == spec) return d;
  }
  return 0;
}

std::string bwd_operand_reason(const BackwardParams& p) {
  struct Operand {
    const char* name;
    const void* ptr;
    const TensorStrides& strides;
    int heads;
  };
  const int h = p.num_heads, hk = p.num_heads_k;
  for (const Operand& o : {Operand{"q", p.q, p.q_strides, h}, Operand{"k", p.k, p.k_strides, hk},
                           Operand{"v", p.v, p.v_strides, hk}, Operand{"out", p.out, p.out_strides, h},
                           Operand{"dout", p.dout, p.dout_strides, h}, Operand{"dq", p.dq, p.dq_strides, h},
                           Operand{"dk", p.dk, p.dk_strides, hk}, Operand{"dv", p.dv, p.dv_strides, hk}}) {
    if (!aligned16(o.ptr)) return std::string(o.name) + " is not 16-byte aligned";
    std::string r = stride_reason(o.name, o.strides, p, o.heads, 8);
    if (!r.empty()) return r;
  }
  return "";
}

template <int kHeadDim>
Status run_bwd_if_built(const BackwardParams& p, int kernel_hdim, bool* ran) {
  if constexpr (headdim_built(kHeadDim)) {
    if (kernel_hdim == kHeadDim) {
      *ran = true;
      return dispatch_dtype(p.dtype, [&](auto dt) -> Status {
        if constexpr (dtype_built(decltype(dt)::value)) {
          return run_bwd<kHeadDim, decltype(dt)::value>(p);
        } else {
          return Status::NotSupported(std::string("sm90 backward: dtype ") + dtype_name(p.dtype) + " is not built");
        }
      });
    }
  }
  return Status::Ok();
}

}  // namespace

std::string backward_unsupported_reason(const BackwardParams& p) {
  const std::string no = "sm90 backward: ";
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return no + "dtype " + dtype_name(p.dtype) + " is not supported (fp16/bf16 only)";
  }
  if (!dtype_built(p.dtype)) return no + "dtype " + dtype_name(p.dtype) + " is not built";
  if (p.head_dim % 8 != 0 || bwd_kernel_head_dim(p.head_dim) == 0) {
    return no + "head_dim " + std::to_string(p.head_dim) +
           " is served by the sm80 backward (sm90 kernels: multiples of 8 served by the 64 / 128 / 256 specialisations)";
  }
  if (p.is_varlen()) return no + "varlen is served by the sm80 backward";
  if (p.dropout_p > 0.f) return no + "dropout is served by the sm80 backward";
  if (p.alibi_slopes != nullptr) return no + "alibi_slopes are served by the sm80 backward";
  if (p.softcap > 0.f) return no + "softcap is served by the sm80 backward";
  if (p.deterministic && p.window_left >= 0) {
    return no + "deterministic=True with a left window edge is served by the sm80 backward";
  }
  if (!(p.softmax_scale > 0.f)) return no + "softmax_scale must be > 0";
  if (p.batch > 65535 || p.num_heads > 65535) return no + "batch and num_heads must be <= 65535";
  const std::string operands = bwd_operand_reason(p);
  return operands.empty() ? "" : no + operands;
}

Status backward(const BackwardParams& p) {
  std::string reason = backward_unsupported_reason(p);
  if (!reason.empty()) return Status::NotSupported(reason);
  const int kernel_hdim = bwd_kernel_head_dim(p.head_dim);
  bool ran = false;
  Status st = run_bwd_if_built<64>(p, kernel_hdim, &ran);
  if (!ran) st = run_bwd_if_built<128>(p, kernel_hdim, &ran);
  if (!ran) st = run_bwd_if_built<256>(p, kernel_hdim, &ran);
  if (!ran) return Status::Internal("sm90 backward: no kernel for head_dim " + std::to_string(p.head_dim));
  return st;
}

std::vector<KernelConfig> configs(int head_dim, DType dtype) {
  std::vector<KernelConfig> out;
  const FwdTilePair* tiles = tiles_of(kernel_head_dim(head_dim, dtype), dtype);
  if (tiles == nullptr || !(dtype_built(dtype) || is_fp8(dtype)) || dtype == DType::kFloat32) return out;
  out.push_back(to_config(tiles->dense));
  if (!(tiles->local == tiles->dense)) out.push_back(to_config(tiles->local));
  return out;
}

}  // namespace flash_attention::sm90
