// Definition of run_fwd<Traits>: picks the kernel variant (with or without softcap / ALiBi / dropout
// code) and launches it. Included only by the generated instantiation files.
#pragma once

#include <atomic>
#include <string>

#include "common/dispatch.h"
#include "cuda/sm80/fwd_api.h"
#include "cuda/sm80/fwd_kernel.h"

namespace flash_attention::sm80 {

// Kernels with more than 48 KB of shared memory must opt in, once per device; `done` (one per kernel)
// remembers the devices where this kernel already did.
template <class Kernel>
cudaError_t allow_smem(Kernel kernel, int smem_bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess || smem_bytes <= 48 * 1024) return err;
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (done.load(std::memory_order_relaxed) & bit) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err == cudaSuccess) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

template <class Traits, bool kExtras>
Status launch_fwd(const FwdArgs& args, cudaStream_t stream) {
  static std::atomic<uint64_t> smem_allowed{0};
  auto kernel = &fwd_kernel<Traits, kExtras>;
  constexpr int kSmem = Traits::kSmemBytes;
  cudaError_t err = allow_smem(kernel, kSmem, smem_allowed);
  if (err == cudaSuccess) {
    const dim3 grid((args.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, args.num_heads, args.batch);
    kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(args);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) {
    return Status::CudaError(std::string("flash_attention sm80 forward launch failed: ") + cudaGetErrorString(err));
  }
  return Status::Ok();
}

template <class Traits>
Status run_fwd(const FwdArgs& args, cudaStream_t stream) {
  return dispatch_bool(args.has_extras(),
                       [&](auto extras) { return launch_fwd<Traits, decltype(extras)::value>(args, stream); });
}

}  // namespace flash_attention::sm80
