// Compile-time shape of an sm80 (mma.sync) attention kernel: tiles, warps, pipeline depth, and the
// CuTe layouts / copy atoms derived from them. Shared by the forward, backward and decode kernels.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "flash_attention/flash_attention.h"

namespace flash_attention::sm80 {

template <DType kDType>
using ElementOf = std::conditional_t<kDType == DType::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

// The m16n8k16 tensor-core atom with fp32 accumulation for a 16-bit element type.
template <class Element>
using MmaAtomOf = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     cute::SM80_16x8x16_F32F16F16F32_TN, cute::SM80_16x8x16_F32BF16BF16F32_TN>;

// Swizzled shared-memory tiles for (rows, head_dim) operands and the copies that fill / read them.
template <class Element_, int kHeadDim_, int kNWarps_>
struct TileBase {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

  // Warps tile the M dimension; the N permutation of 16 lets one ldmatrix.x4 feed two n8 atoms.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtomOf<Element>>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // 64-element (128-byte) rows swizzle with <3,3,3>; head dims that are not multiples of 64 use
  // 32-element rows with <2,3,3>. Either way ldmatrix and 16-byte cp.async are conflict-free.
  static constexpr int kSmemRowElems = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemRowElems == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<kSwizzleBits, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kSmemRowElems>>, cute::Stride<cute::Int<kSmemRowElems>, cute::_1>>{}));

  // Global <-> shared copies: 16 bytes (8 elements) per thread per instruction, rows across threads.
  static constexpr int kGmemThreadsPerRow = kSmemRowElems / 8;
  using GmemThreadLayout = cute::Layout<cute::Shape<cute::Int<kNThreads / kGmemThreadsPerRow>, cute::Int<kGmemThreadsPerRow>>,
                                        cute::Stride<cute::Int<kGmemThreadsPerRow>, cute::_1>>;
  using GmemValLayout = cute::Layout<cute::Shape<cute::_1, cute::_8>>;
  // Full tiles: plain cp.async. Ragged rows / padded head dims: zero-filling cp.async.
  using GmemCopyAsync = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));
  using GmemCopyAsyncZfill = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));
  // Shared -> global (epilogue), through registers.
  using GmemCopyStore = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;            // A, B (K-major)
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;  // B from V (N-major)
  using SmemCopyAtomAccum = cute::Copy_Atom<cute::AutoVectorizingCopyWithAssumedAlignment<32>, Element>;  // C -> smem
};

// Forward kernel traits. kStages >= 2 K/V slots: tile i+1 streams in while tile i is computed.
template <DType kDType_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_, bool kQInRegs_>
struct FwdTraits : TileBase<ElementOf<kDType_>, kHeadDim_, kNWarps_> {
  using Base = TileBase<ElementOf<kDType_>, kHeadDim_, kNWarps_>;
  using Element = typename Base::Element;
  static constexpr DType kDType = kDType_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kStages_;
  static constexpr bool kQInRegs = kQInRegs_;

  static_assert(kStages >= 2, "the K/V pipeline needs at least two slots");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % Base::kSmemRowElems == 0, "tile shape");
  static_assert(kBlockN % (kNThreads / Base::kGmemThreadsPerRow) == 0 &&
                    kBlockM % (kNThreads / Base::kGmemThreadsPerRow) == 0,
                "a tile must be a whole number of copy passes");

  using SmemLayoutQ = decltype(cute::tile_to_shape(typename Base::SmemLayoutAtom{},
                                                   cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      typename Base::SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // V viewed as (head_dim, block_n, stage): the B operand of O = P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                                        cute::Stride<cute::Int<kBlockN>, cute::_1, cute::Int<kBlockN * kHeadDim>>{})));

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> q;  // reused for O in the epilogue
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>> v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

}  // namespace flash_attention::sm80
