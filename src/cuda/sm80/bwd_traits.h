// Compile-time shape of the sm80 backward kernel, on top of the shared TileBase (kernel_traits.h):
// tile sizes, the tensor-core layouts of the five products and the shared-memory layouts with their
// transposed views.
//
// One CTA owns a block of kBlockN keys (K, V and the dK, dV accumulators stay on chip) and walks over
// blocks of kBlockM queries:
//   S  = Q K^T          (M x N)   warps kAtomMSdP along M
//   dP = dO V^T         (M x N)   same layout as S, so S and dP match element by element
//   dV += P^T dO        (N x D)   warps kAtomNdKV along N
//   dK += dS^T Q        (N x D)   same layout as dV
//   dQ  = dS K          (M x D)   warps kAtomMdQ along M, added to fp32 accumulators in global memory
#pragma once

#include <cute/tensor.hpp>

#include "cuda/sm80/kernel_traits.h"

namespace flash_attention::sm80 {

template <class Element, int kWarps, int kAtomM>
using BwdTiledMma = cute::TiledMMA<
    cute::MMA_Atom<MmaAtomOf<Element>>, cute::Layout<cute::Shape<cute::Int<kAtomM>, cute::Int<kWarps / kAtomM>, cute::_1>>,
    cute::Tile<cute::Int<16 * kAtomM>, cute::Int<16 * (kWarps / kAtomM)>, cute::_16>>;

// The (Cols x Rows) transposed view of a (Rows x Cols) shared-memory layout.
template <class Layout, int Rows, int Cols>
using TransposedView = decltype(cute::composition(
    Layout{}, cute::make_layout(cute::Shape<cute::Int<Cols>, cute::Int<Rows>>{}, cute::GenRowMajor{})));

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, int kAtomMSdP, int kAtomNdKV,
          int kAtomMdQ, int kQStages_>
struct BwdTraits : TileBase<Element_, kHeadDim_, kWarps_> {
  using Base = TileBase<Element_, kHeadDim_, kWarps_>;
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNThreads = Base::kNThreads;
  static constexpr int kQStages = kQStages_;  // 2: the next Q block loads while this one computes
  // dQ = dS K runs in column chunks of kDqCols so that fewer fp32 accumulators are live next to dK, dV.
  static constexpr int kDqCols = kHeadDim >= 256 ? kHeadDim / 2 : kHeadDim;
  static_assert(kBlockM % 16 == 0 && kBlockN % 64 == 0 && kHeadDim % Base::kSmemRowElems == 0, "tile shape");

  using TiledMmaSdP = BwdTiledMma<Element, kWarps_, kAtomMSdP>;
  using TiledMmadKV = BwdTiledMma<Element, kWarps_, kAtomNdKV>;
  using TiledMmadQ = BwdTiledMma<Element, kWarps_, kAtomMdQ>;

  using SmemLayoutQ = decltype(cute::tile_to_shape(typename Base::SmemLayoutAtom{},
                                                   cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(typename Base::SmemLayoutAtom{},
                                                   cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // P and dS: kBlockN (a multiple of 64) 16-bit columns, swizzled like 64-wide head dims.
  using SmemLayoutP = decltype(cute::tile_to_shape(
      cute::composition(cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}),
      cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
  using SmemLayoutQt = TransposedView<SmemLayoutQ, kBlockM, kHeadDim>;  // Q^T, dO^T
  using SmemLayoutKt = TransposedView<SmemLayoutK, kBlockN, kHeadDim>;  // K^T
  using SmemLayoutPt = TransposedView<SmemLayoutP, kBlockM, kBlockN>;   // P^T, dS^T

  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKElems = kBlockN * kHeadDim;
  static constexpr int kPElems = kBlockM * kBlockN;
  // Q stages | dO | K | V | P | dS
  static constexpr int kSmemBytes = int(sizeof(Element)) * ((kQStages + 1) * kQElems + 2 * kKElems + 2 * kPElems);
};

}  // namespace flash_attention::sm80
