// KernelConfig: the tunable shape of a CUDA attention kernel, with a readable string form.
//
//   "auto"                      pick from the tuned default table
//   "sm80:m128n64w4s2"          sm80 path, tile 128x64, 4 warps, 2-stage K/V pipeline
//   "sm80:m128n64w4s2q"         ... with Q kept in registers
//   "sm90:m128n128w12s2"        sm90 path (warp-specialised), 12 warps
#pragma once

#include <string>

#include "flash_attention/status.h"

namespace flash_attention {

enum class KernelPath : int { kAuto = 0, kSm80 = 80, kSm90 = 90 };

struct KernelConfig {
  KernelPath path = KernelPath::kAuto;  // kAuto: every other field is ignored
  int block_m = 0;                      // query rows per CTA
  int block_n = 0;                      // key rows per pipeline step
  int num_warps = 0;
  int stages = 0;                       // K/V shared-memory pipeline depth
  bool q_in_regs = false;

  bool is_auto() const { return path == KernelPath::kAuto; }
  std::string to_string() const;
  // Parses the string form above; "" and "auto" give the auto config.
  static Status parse(const std::string& text, KernelConfig* out);

  friend bool operator==(const KernelConfig& a, const KernelConfig& b) {
    return a.path == b.path && a.block_m == b.block_m && a.block_n == b.block_n &&
           a.num_warps == b.num_warps && a.stages == b.stages && a.q_in_regs == b.q_in_regs;
  }
};

}  // namespace flash_attention
