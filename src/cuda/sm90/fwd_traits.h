// Compile-time shape of the sm90 forward kernel: tiles, shared-memory layouts, wgmma tilings, TMA types.
#pragma once

// Tile N of 80 / 112 / 176 needs the wgmma shapes CuTe keeps behind this switch. It must be set before
// the first CuTe header of the translation unit (else CuTe silently tiles N = 176 as 11 x 64x16x16
// wgmmas, ~30% slower), so CMake defines it for every sm90 source; a build without it stops here.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#error "sm90 sources need -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED (cmake/FlashAttentionCuda.cmake sets it)"
#endif

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "cuda/sm90/fwd_args.h"

namespace flash_attention::sm90 {

using namespace cute;

// K-major shared-memory atom for a (rows, kK) tile: the widest swizzle whose row fits kK.
template <class Element, int kK>
constexpr auto smem_atom_k_major() {
  constexpr int kBytes = kK * int(sizeof(Element));
  if constexpr (kBytes % 128 == 0) return GMMA::Layout_K_SW128_Atom<Element>{};
  else if constexpr (kBytes % 64 == 0) return GMMA::Layout_K_SW64_Atom<Element>{};
  else return GMMA::Layout_K_SW32_Atom<Element>{};
}

// V as the (D, N, stages) B operand of O = P V. 16-bit: the bytes of the (N, D, stages) K/V layout,
// modes swapped (MN-major). FP8: its own K-major buffer, loaded by TMA from V^T (see fwd_fp8.h).
template <class Element, int kHeadDim, int kBlockN, int kStages, class SmemLayoutKV>
constexpr auto smem_layout_vt(SmemLayoutKV kv) {
  using Shape3 = Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>;
  if constexpr (sizeof(Element) == 1) {
    return tile_to_shape(smem_atom_k_major<Element, kBlockN>(), Shape3{});
  } else {
    return composition(kv, make_ordered_layout(Shape3{}, Step<_2, _1, _3>{}));
  }
}

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, class Element_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kConsumerWGs = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWGs * 128;
  static constexpr int kThreads = kConsumerThreads + 128;
  // setmaxnreg budgets: producer + consumers <= 512 registers per thread slot of a warpgroup.
  static constexpr int kProducerRegs = kConsumerWGs == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kConsumerWGs == 2 ? 240 : 160;
  static_assert(kBlockM % 64 == 0 && kConsumerWGs >= 1 && kConsumerWGs <= 3);
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256 && kBlockN % 16 == 0 && kBlockN <= 256);

  using TileQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;  // S = Q K^T  (M, N, K=D)
  using TilePV = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;  // O = P V    (M, D, K=N)
  using WGLayout = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;        // warpgroups split M

  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, TileQK>(), WGLayout{}));
  // FP8 (e4m3): wgmma takes both operands K-major, so V arrives transposed (V^T, keys contiguous; see
  // fwd_fp8.h) and the output is bf16. 16-bit types read V as an MN-major B operand.
  static constexpr bool kFp8 = sizeof(Element) == 1;
  using ElementOut = std::conditional_t<kFp8, cutlass::bfloat16_t, Element>;
  static_assert(!kFp8 || kBlockN % 32 == 0, "e4m3 P V wgmma needs block_n % 32 == 0");
  static constexpr GMMA::Major kMajorV = kFp8 ? GMMA::Major::K : GMMA::Major::MN;
  // Where O outweighs S per thread (head dim > block N: hdim 256, also 192), a warpgroup's exponentials
  // run while its own P V is in flight and its O rescale is skipped when no row max moved
  // (kFwdSkipRescale). ptxas hoists the P V wait above the exponentials unless a memory operation needs
  // them first; consume_tile stores the row sums. H200, bf16, hdim 256, same run: +8 to +30 % dense and
  // causal against session 5's kernel (wait hoisted, no skip), +7 to +18 % against the pinned wait alone.
  // With one P buffer it does not pay below (hdim 64 -6 to -8 %, hdim 128 -3 to +2 %: the conversions to
  // P then queue behind the wait instead of hiding under the exponentials); there the wait stays where
  // ptxas puts it and the O rescale is unconditional, unless P has two buffers (kDoubleP).
  // benchmarks/NOTES.md, session 7.
  static constexpr bool kWideO = kHeadDim > kBlockN;
  // At head dim == block N (hdim 128, every length since session 7) the P V of block n + 1 reads one P
  // buffer while block n's P is converted into the other before the wait (consume_tile, two blocks a loop
  // trip), so the exponentials go before the wait there too; registers per thread: S 64 + O 64 + 2 x P 32.
  // H200, bf16, same run: +3 to +6 % at 1k / 2k, dense and causal. Not at hdim 64 (N = 128): -3 to +1 %.
  // Not FP8.
  static constexpr bool kDoubleP = !kFp8 && kHeadDim == kBlockN && kConsumerWGs == 2;
  static constexpr bool kExpsBeforePVWait = kWideO || kDoubleP;

  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TilePV, GMMA::Major::K, kMajorV>(), WGLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(
      smem_atom_k_major<Element, kHeadDim>(),
      Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(
      smem_atom_k_major<Element, kHeadDim>(),
      Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(smem_layout_vt<Element, kHeadDim, kBlockN, kStages>(SmemLayoutKV{}));
  using SmemLayoutVLoad = std::conditional_t<kFp8, SmemLayoutVt, SmemLayoutKV>;  // what TMA writes
  using TileV = std::conditional_t<kFp8, Shape<Int<kHeadDim>, Int<kBlockN>>, Shape<Int<kBlockN>, Int<kHeadDim>>>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  // O leaves through shared memory: each consumer warpgroup writes its (64, D) rows with stmatrix and one
  // thread stores them with TMA. The staging tile has its own buffer where shared memory allows; else it
  // takes the start of the V buffer, free once both warpgroups finished the tile's last P V (the producer
  // then holds the next tile's V loads until the store has read it).
  using TilePVWG = Shape<_64, Int<kHeadDim>, Int<kBlockN>>;  // one warpgroup's P V
  using MmaPVWG = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TilePVWG, GMMA::Major::K, kMajorV>()));
  using SmemLayoutOWG = decltype(tile_to_shape(smem_atom_k_major<ElementOut, kHeadDim>(), select<0, 1>(TilePVWG{})));
  static constexpr int kSmemBytesO = kBlockM * kHeadDim * int(sizeof(ElementOut));
  static constexpr int kSmemBytesQKV =
      int((cosize_v<SmemLayoutQ> + cosize_v<SmemLayoutKV> + cosize_v<SmemLayoutVLoad>) * sizeof(Element));
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr bool kOAliasesV = kSmemBytesQKV + kSmemBytesO + 1024 > kSmemLimit;
  static_assert(!kOAliasesV || kSmemBytesO <= int(cosize_v<SmemLayoutVLoad> * sizeof(Element)));

  struct OBuffer {
    cute::array_aligned<ElementOut, kBlockM * kHeadDim, 1024> o;
  };
  struct NoOBuffer {};

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutVLoad>, 1024> v;
    std::conditional_t<kOAliasesV, NoOBuffer, OBuffer> o_buffer;
    typename Pipeline::SharedStorage pipe_k;
    typename Pipeline::SharedStorage pipe_v;
    alignas(8) uint64_t q_full;   // Q tile landed (TMA transaction barrier)
    alignas(8) uint64_t q_empty;  // consumers done reading Q (all consumer threads arrive)
    alignas(8) uint64_t o_empty;  // V buffer free of the last O tile (one thread per consumer warpgroup)
    alignas(8) uint64_t tile_full;   // tile_id holds the CTA's next tile (schedule_tiles)
    alignas(8) uint64_t tile_empty;  // every consumer thread and the producer have read it
    int tile_id;
    float row_sum_sink[kExpsBeforePVWait ? kConsumerThreads : 1];  // written before the P V wait, never read

    // The O staging tile of consumer warpgroup wg: (64, D).
    CUTE_DEVICE ElementOut* o_tile(int wg) {
      ElementOut* base;
      if constexpr (kOAliasesV) {
        base = reinterpret_cast<ElementOut*>(v.data());
      } else {
        base = o_buffer.o.data();
      }
      return base + wg * 64 * kHeadDim;
    }
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= kSmemLimit, "tile does not fit in shared memory");

  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  // Global tensors as TMA sees them: (rows, head_dim, heads, batch); varlen uses batch = 1.
  using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{},
                                      select<0, 2>(TileQK{}), _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutKV{}),
                                       select<1, 2>(TileQK{}), _1{}));
  // V: as K for 16-bit types; FP8 reads V^T as (head_dim, keys, heads, batch) tiles of TileV.
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutVLoad{}), TileV{}, _1{}));
  using GmemTensorOut =
      decltype(make_tensor(make_gmem_ptr(static_cast<ElementOut*>(nullptr)), GmemShape{}, GmemStride{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GmemTensorOut{}, SmemLayoutOWG{},
                                      select<0, 1>(TilePVWG{}), _1{}));

  struct Params {
    TmaQ tma_q;
    TmaKV tma_k;
    TmaV tma_v;
    TmaO tma_o;  // out, (rows, head_dim, heads, batch) as q
    GmemShape shape_q;
    GmemShape shape_k;
    GmemShape shape_v;
    FwdArgs args;
  };
};

}  // namespace flash_attention::sm90
