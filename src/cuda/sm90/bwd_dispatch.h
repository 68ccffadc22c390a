// Entry points of the sm90 backward kernels, one per (head dim, dtype); each instantiation file
// src/cuda/instantiations/sm90_bwd_hdim<D>_<dtype>.cu defines one. Light: no CuTe.
#pragma once

#include "flash_attention/flash_attention.h"

namespace flash_attention::sm90 {

// Head dims with a backward kernel (others are served by the sm80 backward).
constexpr int kBwdHeadDims[] = {64, 128, 256};

// Runs preprocess, main and dQ kernels. `p` is validated, normalised and accepted by
// backward_unsupported_reason(); p.head_dim <= kHeadDim.
template <int kHeadDim, DType kDtype>
Status run_bwd(const BackwardParams& p);

}  // namespace flash_attention::sm90
