// CUDA backward dispatch (sm80 path). Placeholder until the backward kernels land.
#include "cuda/cuda_api.h"

namespace flash_attention::cuda {

Status backward(const BackwardParams& params) {
  (void)params;
  return Status::NotSupported("the CUDA backward kernel is not built yet");
}

}  // namespace flash_attention::cuda
