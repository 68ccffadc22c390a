// The one runtime -> compile-time switch of the CUDA code.
//
// Each helper calls `fn` with a std::integral_constant carrying the value, so the callee can use it as
// a template argument:
//
//   dispatch_dtype(params.dtype, [&](auto dt) { run<decltype(dt)::value>(...); });
//
// Head dims: FA_HEADDIMS_BUILT (a comma list set by CMake) names the specialisations compiled;
// a head dim is served by the smallest built specialisation >= it (the kernel zero-pads the rest).
// Dtypes: FA_DTYPES_BUILT (fp16, bf16) likewise. Without the macros every specialisation counts as built.
#pragma once

#include <type_traits>
#include <utility>

#include "flash_attention/flash_attention.h"

namespace flash_attention {

namespace built {
enum BuiltDType { fp16, bf16 };
#if defined(FA_HEADDIMS_BUILT)
inline constexpr int kHeadDims[] = {FA_HEADDIMS_BUILT};
#else
inline constexpr int kHeadDims[] = {32, 64, 96, 128, 192, 256};
#endif
#if defined(FA_DTYPES_BUILT)
inline constexpr BuiltDType kDTypes[] = {FA_DTYPES_BUILT};
#else
inline constexpr BuiltDType kDTypes[] = {fp16, bf16};
#endif
}  // namespace built

// Every head-dim specialisation the kernels know, ascending.
inline constexpr int kHeadDimSpecialisations[] = {32, 64, 96, 128, 192, 256};

constexpr bool headdim_built(int head_dim) {
  for (int d : built::kHeadDims) {
    if (d == head_dim) return true;
  }
  return false;
}

constexpr bool dtype_built(DType dtype) {
  for (built::BuiltDType d : built::kDTypes) {
    if ((d == built::fp16 && dtype == DType::kFloat16) || (d == built::bf16 && dtype == DType::kBFloat16)) {
      return true;
    }
  }
  return false;
}

// The built specialisation that serves `head_dim`, or 0 if none is large enough.
constexpr int headdim_specialisation(int head_dim) {
  for (int d : kHeadDimSpecialisations) {
    if (d >= head_dim && headdim_built(d)) return d;
  }
  return 0;
}

template <class Fn>
decltype(auto) dispatch_bool(bool value, Fn&& fn) {
  if (value) return fn(std::true_type{});
  return fn(std::false_type{});
}

// Calls fn(integral_constant<DType, ...>) for fp16 / bf16; fp32 has no kernels (callers check first).
template <class Fn>
decltype(auto) dispatch_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::kBFloat16) return fn(std::integral_constant<DType, DType::kBFloat16>{});
  return fn(std::integral_constant<DType, DType::kFloat16>{});
}

// Calls fn(integral_constant<int, D>) with D = headdim_specialisation(head_dim). Only built
// specialisations are ever passed, so fn may reference their (separately compiled) instantiations.
template <class Fn>
decltype(auto) dispatch_headdim(int head_dim, Fn&& fn) {
  const int spec = headdim_specialisation(head_dim);
  auto call = [&](auto d) -> decltype(fn(std::integral_constant<int, 32>{})) {
    if constexpr (headdim_built(decltype(d)::value)) {
      return fn(d);
    } else {
      return fn(std::integral_constant<int, 0>{});  // unreachable: spec is always built
    }
  };
  switch (spec) {
    case 32: return call(std::integral_constant<int, 32>{});
    case 64: return call(std::integral_constant<int, 64>{});
    case 96: return call(std::integral_constant<int, 96>{});
    case 128: return call(std::integral_constant<int, 128>{});
    case 192: return call(std::integral_constant<int, 192>{});
    case 256: return call(std::integral_constant<int, 256>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

}  // namespace flash_attention
