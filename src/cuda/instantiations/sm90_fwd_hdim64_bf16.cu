// sm90 forward kernels for head dim 64, bf16 (both tiles of kFwdTiles).
#include "cuda/sm90/fwd_launch.h"

namespace flash_attention::sm90 {

template <>
Status run_fwd<64, DType::kBFloat16>(const ForwardParams& p, const FwdTile& tile) {
  return launch_fwd_tile<64, cutlass::bfloat16_t>(p, tile);
}

}  // namespace flash_attention::sm90
