// Register-level helpers of the sm80 kernels: accumulator layout views, fragment conversion and the
// two tensor-core GEMM loops (operands from shared memory, or A already in registers).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace flash_attention::sm80 {

// View an m16n8 accumulator ((2, 2), MMA_M, MMA_N) as (rows, cols) = ((2, MMA_M), (2, MMA_N)):
// mode 0 of the atom walks two adjacent columns, mode 1 the rows r and r + 8.
template <class Layout>
__device__ constexpr auto rowcol_layout(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank<0>(acc))::value == 2 && decltype(rank(acc))::value == 3);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

template <class T>
__device__ auto rowcol(T&& t) {
  using namespace cute;
  return make_tensor(t.data(), rowcol_layout(t.layout()));
}

// Reuse an m16n8 accumulator (as 16-bit values) as the A operand of an m16n8k16 MMA:
// ((2, 2), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, MMA_N / 2); two n8 tiles make one k16 slice.
template <class Layout>
__device__ constexpr auto acc_as_a_layout(Layout acc) {
  using namespace cute;
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// Element-wise conversion of a register fragment (fp32 accumulators -> 16-bit operands).
// Both fragments are compact register tensors with the same layout.
template <class To, class Frag>
__device__ auto convert_fragment(const Frag& src) {
  using namespace cute;
  using From = typename Frag::value_type;
  constexpr int kN = decltype(size(src))::value;
  cutlass::NumericArrayConverter<To, From, kN> convert;
  auto frag = convert(*reinterpret_cast<const cutlass::Array<From, kN>*>(src.data()));
  auto out = make_tensor<To>(src.layout());
  *reinterpret_cast<cutlass::Array<To, kN>*>(out.data()) = frag;
  return out;
}

// acc += A B^T with A and B fragments streamed from shared memory one k16 slice ahead of the MMAs.
// kLoadA = false when A already sits in registers (loaded once, e.g. Q kept in registers).
template <bool kLoadA, class Acc, class FragA, class FragB, class SrcA, class SrcB, class Mma, class CopyA, class CopyB>
__device__ void gemm_smem(Acc& acc, FragA& rA, FragB& rB, const SrcA& sA, const SrcB& sB, const Mma& mma,
                          const CopyA& copy_a, const CopyB& copy_b) {
  using namespace cute;
  auto rA_view = copy_a.get_thread_slice(threadIdx.x).retile_D(rA);
  auto rB_view = copy_b.get_thread_slice(threadIdx.x).retile_D(rB);
  constexpr int kSlices = decltype(size<2>(rA))::value;
  if constexpr (kLoadA) copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      if constexpr (kLoadA) copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with A in registers and B streamed from shared memory.
template <class Acc, class FragA, class FragB, class SrcB, class Mma, class CopyB>
__device__ void gemm_rs(Acc& acc, const FragA& rA, FragB& rB, const SrcB& sB, const Mma& mma, const CopyB& copy_b) {
  using namespace cute;
  auto rB_view = copy_b.get_thread_slice(threadIdx.x).retile_D(rB);
  constexpr int kSlices = decltype(size<2>(rA))::value;
  copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Reductions over the four threads of a quad, which together hold one accumulator row.
template <class Op>
__device__ __forceinline__ float quad_allreduce(float x, Op op) {
  using namespace cute;
  x = op(x, __shfl_xor_sync(0xffffffff, x, 1));
  return op(x, __shfl_xor_sync(0xffffffff, x, 2));
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

}  // namespace flash_attention::sm80
