// Door into the sm80 backward kernels, included by src/cuda/backward.cu. Each (head dim, element type,
// dropout) is compiled in its own generated file, src/cuda/instantiations/sm80_bwd_hdim<D>_<dtype>[_dropout].cu.
#pragma once

#include <cstddef>

#include "cuda/sm80/bwd_params.h"
#include "flash_attention/status.h"

namespace flash_attention::sm80 {

// Scratch memory of one backward call: dsum (fp32, the layout of softmax_lse) and the fp32 dQ
// accumulators. `bytes` is what `run_bwd` needs for p; it allocates that itself on the stream when
// `ptr` is null.
struct BwdWorkspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// Runs preprocess, main and dQ kernels for p.head_dim <= kHeadDim (the head dim is zero-padded).
// p's workspace fields (dsum, dq_accum, num_splits, ...) are filled in here.
template <int kHeadDim, class Element, bool kDropout>
Status run_bwd(BwdKernelParams p, BwdWorkspace workspace, void* stream);

}  // namespace flash_attention::sm80
