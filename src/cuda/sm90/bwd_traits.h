// Compile-time shape of the sm90 backward kernel: tiles, shared-memory layouts, wgmma tilings, TMA.
//
// A CTA owns kBlockN keys and walks query blocks of kBlockM rows. The score tile is computed
// transposed, S^T = K Q^T (keys x queries). Two tile families:
//
//   kBlockN = 128 (head dims <= 128): each consumer warpgroup owns 64 keys. P^T and dS^T come out of
//     its accumulators already in the register layout of the A operand of dV += P^T dO and
//     dK += dS^T Q: both GEMMs take A from registers and keep their accumulators in registers for the
//     whole CTA. dS^T is also stored to shared memory (query-contiguous) as the A operand of dQ = dS K.
//   kBlockN = 64 (head dim 256, "shared keys"): one warpgroup's dK + dV for 64 keys would need 2 * D
//     fp32 registers per thread (512 at D = 256). Both warpgroups share the 64 keys instead: warpgroup 0
//     computes S^T -> P^T, warpgroup 1 dP^T -> dS^T (reading P^T back), both tiles meet in shared memory,
//     and dV, dK, dQ are split along D (each warpgroup D / 2 columns, shared-memory operands).
#pragma once

#include <type_traits>

#include "cuda/sm90/bwd_args.h"
#include "cuda/sm90/fwd_traits.h"  // smem_atom_k_major, CuTe / pipeline includes

namespace flash_attention::sm90 {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, class Element_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kStages = kStages_;  // Q / dO shared-memory stages
  static constexpr bool kSharedKeys = kBlockN == 64;
  static constexpr int kConsumerWGs = 2;
  static constexpr int kConsumerThreads = kConsumerWGs * 128;
  static constexpr int kThreads = kConsumerThreads + 128;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(kBlockN == 64 || kBlockN == 128);
  static_assert(kBlockM == 64 || (kBlockM == 128 && !kSharedKeys));
  static_assert(kSharedKeys ? kHeadDim % 128 == 0 && kHeadDim <= 256 : kHeadDim % 64 == 0 && kHeadDim <= 128);

  // dQ (kBlockM x D): with 64 query rows the warpgroups split D, with 128 they split the rows.
  static constexpr bool kDqSplitsD = kBlockM == 64;

  using TileSdP = Shape<Int<kBlockN>, Int<kBlockM>, Int<kHeadDim>>;  // S^T = K Q^T, dP^T = V dO^T
  using TileDKV = Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>;  // dV = P^T dO, dK = dS^T Q
  using TileDQ = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;   // dQ = dS K
  using TileDQWG = Shape<_64, Int<kDqSplitsD ? kHeadDim / 2 : kHeadDim>, Int<kBlockN>>;  // one warpgroup's part
  using OneWG = Layout<Shape<_1, _1, _1>>;
  using WGAlongM = Layout<Shape<_2, _1, _1>>;
  using WGAlongN = Layout<Shape<_1, _2, _1>>;
  using WGDq = std::conditional_t<kDqSplitsD, WGAlongN, WGAlongM>;

  // Per-warpgroup keys: the warpgroups split the keys (M) of S^T / dP^T and of dK / dV, whose A operands
  // come from registers. Shared keys: one warpgroup computes the whole S^T (or dP^T); dK / dV split D
  // and read P^T / dS^T from shared memory.
  using MmaSdP = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, TileSdP>(),
                                         std::conditional_t<kSharedKeys, OneWG, WGAlongM>{}));
  using MmaDKVRS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileDKV, GMMA::Major::K, GMMA::Major::MN>(), WGAlongM{}));
  using MmaDKVSS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockN>, Int<kHeadDim / 2>, Int<kBlockM>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      WGAlongN{}));
  using MmaDKV = std::conditional_t<kSharedKeys, MmaDKVSS, MmaDKVRS>;
  using MmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, TileDQWG, GMMA::Major::MN, GMMA::Major::MN>(), WGDq{}));

  // Q and dO: (M, D, stages), K-major; their (D, M) views are the MN-major B operands of dK / dV.
  using SmemLayoutQ = decltype(tile_to_shape(smem_atom_k_major<Element, kHeadDim>(),
                                             Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  // K and V: (N, D), K-major; K's (D, N) view is the MN-major B operand of dQ.
  using SmemLayoutK = decltype(tile_to_shape(smem_atom_k_major<Element, kHeadDim>(),
                                             Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{})));
  // dS: (M, N, 2 buffers), query-contiguous (MN-major A operand of dQ); dS^T is the (N, M) view the
  // S^T accumulators are stored through.
  using SmemLayoutDS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockM>, Int<kBlockN>, _2>{}));
  using SmemLayoutDSt = decltype(composition(
      SmemLayoutDS{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, _2>{}, Step<_2, _1, _3>{})));
  // Shared keys: P^T and dS^T as the K-major A operands of dV / dK, (N, M, 2 buffers). With 64 queries
  // (one 128-byte swizzle row) this is the same memory order as SmemLayoutDS, so dS^T written through it
  // is read back as dS by the dQ GEMM.
  using SmemLayoutPt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kBlockN>, Int<kBlockM>, _2>{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  static constexpr int kDqElems = kBlockM * kHeadDim;  // one fp32 dQ tile (dq_accum block)

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, cosize_v<SmemLayoutDS>, 1024> ds;
    // Shared keys: P^T (2 buffers). Per-warpgroup keys: dQ staged for the bulk reduce-add (the shared-keys
    // kernel adds dQ from registers: its tiles leave no room).
    cute::array_aligned<Element, kSharedKeys ? cosize_v<SmemLayoutPt> : 0, kSharedKeys ? 1024 : 16> p;
    cute::array_aligned<float, kSharedKeys ? 0 : kDqElems, 128> dq;
    cute::array_aligned<float, kBlockM * kStages, 16> lse;   // lse_log2 of the Q stage's rows
    cute::array_aligned<float, kBlockM * kStages, 16> dsum;  // dsum of the dO stage's rows
    typename Pipeline::SharedStorage pipe_q;
    typename Pipeline::SharedStorage pipe_do;
    alignas(8) uint64_t kv_full;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "tile does not fit in shared memory");

  // Bytes landing per Q (or dO) stage: the tile plus its lse_log2 (or dsum) rows.
  static constexpr uint32_t kStageBytes = kBlockM * kHeadDim * sizeof(Element) + kBlockM * sizeof(float);
  static constexpr uint32_t kTmaBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);

  using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;  // (rows, head_dim, heads, batch)
  using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                          GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutK{},
                                      Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  struct Params {
    TmaQ tma_q;
    TmaQ tma_do;
    TmaK tma_k;
    TmaK tma_v;
    GmemShape shape_q;
    GmemShape shape_k;
    BwdArgs args;
  };
};

}  // namespace flash_attention::sm90
