// sm90 forward kernels for head dim 128, fp16 (both tiles of kFwdTiles).
#include "cuda/sm90/fwd_launch.h"

namespace flash_attention::sm90 {

template <>
Status run_fwd<128, DType::kFloat16>(const ForwardParams& p, const FwdTile& tile) {
  return launch_fwd_tile<128, cutlass::half_t>(p, tile);
}

}  // namespace flash_attention::sm90
