// The table of compiled sm80 forward kernels (sm80::fwd_kernels), built from the generated X-macro
// list. Only head dims / dtypes that this build compiled are referenced, so the linker never asks for
// an instantiation that CMake filtered out.
#include "common/dispatch.h"
#include "cuda/sm80/fwd_api.h"
#include "cuda/sm80/fwd_registry.h"
#include "cuda/sm80/kernel_traits.h"

namespace flash_attention::sm80 {
namespace {

template <DType kDType, int kHeadDim>
void collect(std::vector<FwdKernel>& out) {
#define FA_COLLECT(hd, m, n, w, s, q)                                                        \
  if constexpr (hd == kHeadDim) {                                                            \
    using T = FwdTraits<kDType, hd, m, n, w, s, q>;                                          \
    out.push_back({KernelConfig{KernelPath::kSm80, m, n, w, s, q}, T::kSmemBytes, &run_fwd<T>}); \
  }
  FA_SM80_FWD_CONFIGS(FA_COLLECT)
#undef FA_COLLECT
}

}  // namespace

std::vector<FwdKernel> fwd_kernels(int head_dim_specialisation, DType dtype) {
  std::vector<FwdKernel> out;
  if (dtype == DType::kFloat32 || headdim_specialisation(head_dim_specialisation) != head_dim_specialisation) {
    return out;
  }
  dispatch_dtype(dtype, [&](auto dt) {
    constexpr DType kDType = decltype(dt)::value;
    if constexpr (dtype_built(kDType)) {
      dispatch_headdim(head_dim_specialisation, [&](auto hd) {
        if constexpr (decltype(hd)::value != 0) collect<kDType, decltype(hd)::value>(out);
      });
    }
  });
  return out;
}

}  // namespace flash_attention::sm80
