// The sm90 door (cuda/sm90/sm90_api.h): what the Hopper kernels serve, and the dispatch to the
// per-(head dim, dtype) kernels compiled into this build.
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "cuda/sm90/fwd_dispatch.h"
#include "cuda/sm90/sm90_api.h"

namespace flash_attention::sm90 {
namespace {

// The kernel head dim serving `head_dim`: the smallest built tile head dim >= it (padding), or 0.
int kernel_head_dim(int head_dim) {
  int best = 0;
  for (const FwdTilePair& t : kFwdTiles) {
    const int d = t.dense.head_dim;
    if (d >= head_dim && headdim_built(d) && (best == 0 || d < best)) best = d;
  }
  return best;
}

const FwdTilePair* tiles_of(int kernel_hdim) {
  for (const FwdTilePair& t : kFwdTiles) {
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
  const FwdTilePair* tiles = tiles_of(kernel_head_dim(p.head_dim));
  if (tiles == nullptr) return "sm90: no kernel built for head_dim " + std::to_string(p.head_dim);
  const KernelConfig& want = p.config;
  if (want.is_auto()) {
    *out = is_local(p) ? tiles->local : tiles->dense;
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

// TMA and the 16-byte epilogue need every stride of a mode with extent > 1 to be a multiple of 8
// elements (16 bytes).
std::string stride_reason(const char* name, const TensorStrides& s, const ForwardParams& p,
                          int heads) {
  const bool batch_used = !p.is_varlen() && p.batch > 1;
  if (s.row % 8 != 0) return std::string(name) + " row stride is not a multiple of 8 elements";
  if (heads > 1 && s.head % 8 != 0) return std::string(name) + " head stride is not a multiple of 8 elements";
  if (batch_used && s.batch % 8 != 0) return std::string(name) + " batch stride is not a multiple of 8 elements";
  return "";
}

template <int kHeadDim>
Status run_if_built(const ForwardParams& p, const FwdTile& tile, bool* ran) {
  if constexpr (headdim_built(kHeadDim)) {
    if (tile.head_dim == kHeadDim) {
      *ran = true;
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

}  // namespace

std::string unsupported_reason(const ForwardParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return std::string("sm90 path: dtype ") + dtype_name(p.dtype) + " is not supported (fp16/bf16 only)";
  }
  if (!dtype_built(p.dtype)) return std::string("sm90 path: dtype ") + dtype_name(p.dtype) + " is not built";
  if (p.head_dim % 8 != 0 || p.head_dim > 256) {
    return "sm90 path: head_dim must be a multiple of 8 and <= 256 (got " + std::to_string(p.head_dim) + ")";
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
  for (const Operand& o : {Operand{"q", p.q_strides, p.num_heads}, Operand{"k", p.k_strides, p.num_heads_k},
                           Operand{"v", p.v_strides, p.num_heads_k}, Operand{"out", p.out_strides, p.num_heads}}) {
    std::string r = stride_reason(o.name, o.strides, p, o.heads);
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

std::string backward_unsupported_reason(const BackwardParams& p) {
  (void)p;
  return "sm90 path: the backward kernel is not built yet (the sm80 backward serves sm90)";
}

Status backward(const BackwardParams& p) { return Status::NotSupported(backward_unsupported_reason(p)); }

std::vector<KernelConfig> configs(int head_dim, DType dtype) {
  std::vector<KernelConfig> out;
  const FwdTilePair* tiles = tiles_of(kernel_head_dim(head_dim));
  if (tiles == nullptr || !dtype_built(dtype) || dtype == DType::kFloat32) return out;
  out.push_back(to_config(tiles->dense));
  if (!(tiles->local == tiles->dense)) out.push_back(to_config(tiles->local));
  return out;
}

}  // namespace flash_attention::sm90
