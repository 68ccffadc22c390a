// Entry points of the sm90 forward kernels, one per (head dim, dtype); each instantiation file
// src/cuda/instantiations/sm90_fwd_hdim<D>_<dtype>.cu defines one. Light: no CuTe.
#pragma once

#include "cuda/sm90/tiles.h"
#include "flash_attention/flash_attention.h"

namespace flash_attention::sm90 {

// Launches the forward kernel with `tile` (one of kFwdTiles' tiles for kHeadDim). `p` is validated,
// normalised and accepted by unsupported_reason(); p.head_dim <= kHeadDim.
template <int kHeadDim, DType kDtype>
Status run_fwd(const ForwardParams& p, const FwdTile& tile);

}  // namespace flash_attention::sm90
