// The sm80 forward path as seen from the dispatch: typed launchers (defined in fwd_launch.h and
// instantiated per (head dim, dtype) under src/cuda/instantiations/) and the table of what was built.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "cuda/sm80/fwd_args.h"
#include "flash_attention/flash_attention.h"

namespace flash_attention::sm80 {

// Launches the forward kernel of `Traits` (a FwdTraits) for `args` on `stream`.
template <class Traits>
Status run_fwd(const FwdArgs& args, cudaStream_t stream);

using FwdLauncher = Status (*)(const FwdArgs&, cudaStream_t);

struct FwdKernel {
  KernelConfig config;
  int smem_bytes;
  FwdLauncher launch;
};

// The forward kernels compiled for a head-dim specialisation and dtype (empty when none).
std::vector<FwdKernel> fwd_kernels(int head_dim_specialisation, DType dtype);

}  // namespace flash_attention::sm80
