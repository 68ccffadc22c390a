// Public entry points: validate, normalise, route to the CPU implementation or the CUDA kernels.
#include "cpu/cpu_attention.h"
#include "flash_attention/flash_attention.h"
#ifdef FLASH_ATTENTION_WITH_CUDA
#include "cuda/cuda_api.h"
#endif

namespace flash_attention {
namespace {

#ifndef FLASH_ATTENTION_WITH_CUDA
const char kNoCuda[] = "built without CUDA";
#endif

}  // namespace

Status forward(ForwardParams params) {
  FA_RETURN_IF_ERROR(validate(params));
  normalize(params);
  if (params.device == Device::kCPU) return cpu::forward(params);
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::forward(params);
#else
  return Status::NotSupported(kNoCuda);
#endif
}

Status backward(BackwardParams params) {
  FA_RETURN_IF_ERROR(validate(params));
  normalize(params);
  if (params.device == Device::kCPU) return cpu::backward(params);
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::backward(params);
#else
  return Status::NotSupported(kNoCuda);
#endif
}

Status dropout_mask(Device device, uint64_t seed, uint64_t offset, float p, int batch, int heads,
                    int seqlen_q, int seqlen_k, uint8_t* mask, void* stream) {
  if (!(p >= 0.f && p < 1.f)) return Status::InvalidArgument("dropout_p must be in [0, 1)");
  if (batch < 1) return Status::InvalidArgument("batch must be >= 1");
  if (heads < 1) return Status::InvalidArgument("heads must be >= 1");
  if (seqlen_q < 1) return Status::InvalidArgument("seqlen_q must be >= 1");
  if (seqlen_k < 1) return Status::InvalidArgument("seqlen_k must be >= 1");
  if (mask == nullptr) return Status::InvalidArgument("mask is a null pointer");
  if (device == Device::kCPU)
    return cpu::dropout_mask(seed, offset, p, batch, heads, seqlen_q, seqlen_k, mask);
  if (device != Device::kCUDA) return Status::InvalidArgument("device is not a known device");
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::dropout_mask(seed, offset, p, batch, heads, seqlen_q, seqlen_k, mask, stream);
#else
  return Status::NotSupported(kNoCuda);
#endif
}

bool cuda_built() {
#ifdef FLASH_ATTENTION_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<int> cuda_archs_built() {
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::archs_built();
#else
  return {};
#endif
}

std::string cuda_unsupported_reason(const ForwardParams& params, int device_arch) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  ForwardParams p = params;
  p.device = Device::kCUDA;
  normalize(p);  // a capability query: pointers may be unset, so no validate()
  return cuda::unsupported_reason(p, device_arch);
#else
  return kNoCuda;
#endif
}

std::vector<KernelConfig> cuda_configs(int arch, int head_dim, DType dtype) {
#ifdef FLASH_ATTENTION_WITH_CUDA
  return cuda::configs(arch, head_dim, dtype);
#else
  return {};
#endif
}

}  // namespace flash_attention
