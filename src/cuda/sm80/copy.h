// Global -> shared tile loads with cp.async, with and without bounds predication.
#pragma once

#include <cute/tensor.hpp>

namespace flash_attention::sm80 {

// Copies a (CPY, CPY_ROWS, CPY_COLS) partition, zero-filling the 16-byte chunks whose tile-local row
// is >= max_rows (kCheckRows) or whose column is >= max_cols. `coords` is the same partition of an
// identity tensor.
template <bool kCheckRows = true, class ZfillCopy, class Src, class Dst, class Coords>
__device__ void copy_zfill(const ZfillCopy& tiled_copy, const Src& src, Dst&& dst, const Coords& coords,
                           int max_rows, int max_cols) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    const bool row_ok = !kCheckRows || get<0>(coords(0, m, 0)) < max_rows;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      const bool ok = row_ok && get<1>(coords(0, m, k)) < max_cols;
      copy(tiled_copy.with(ok), src(_, m, k), dst(_, m, k));
    }
  }
}

// copy_zfill of a tile whose rows are all in bounds: the column predicate only.
template <class ZfillCopy, class Src, class Dst, class Coords>
__device__ void copy_zfill_cols(const ZfillCopy& tiled_copy, const Src& src, Dst&& dst, const Coords& coords,
                                int max_cols) {
  copy_zfill<false>(tiled_copy, src, dst, coords, 0, max_cols);
}

// Loads one tile: plain cp.async when it is fully in bounds, zero-filling cp.async otherwise.
template <class Copy, class ZfillCopy, class Src, class Dst, class Coords>
__device__ void load_tile(const Copy& plain, const ZfillCopy& zfill, const Src& src, Dst&& dst, const Coords& coords,
                          int max_rows, int max_cols, bool in_bounds) {
  if (in_bounds) {
    cute::copy(plain, src, dst);
  } else {
    copy_zfill(zfill, src, dst, coords, max_rows, max_cols);
  }
}

// Stores a register tile to global memory, skipping chunks outside (max_rows, max_cols).
template <class Copy, class Src, class Dst, class Coords>
__device__ void store_tile(const Copy& tiled_copy, const Src& src, Dst&& dst, const Coords& coords, int max_rows,
                           int max_cols) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coords(0, m, 0)) >= max_rows) continue;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      if (get<1>(coords(0, m, k)) < max_cols) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    }
  }
}

}  // namespace flash_attention::sm80
