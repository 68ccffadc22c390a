// Tile shapes of the sm90 forward kernel, shared by the instantiation files and the dispatcher.
// Every hdim has one tile for non-local attention and one for causal / windowed attention
// (smaller N: less masked work on the diagonal). Both are built for each (hdim, dtype).
#pragma once

namespace flash_attention::sm90 {

struct FwdTile {
  int head_dim;
  int block_m;  // query rows per CTA = 64 x consumer warpgroups
  int block_n;  // key rows per pipeline stage
  int stages;   // K/V shared-memory stages

  friend constexpr bool operator==(const FwdTile& a, const FwdTile& b) {
    return a.head_dim == b.head_dim && a.block_m == b.block_m && a.block_n == b.block_n &&
           a.stages == b.stages;
  }
};

// {dense tile, local tile} for one head dim. Shared memory: Q + 2 * stages * K/V tiles <= 227 KB.
// The automatic choice by key count: dense calls with at most `dense_short_keys` keys take the local tile;
// causal calls (no left window) with more than `causal_long_keys` keys take the dense tile (0: never).
struct FwdTilePair {
  FwdTile dense;
  FwdTile local;
  int dense_short_keys = 0;
  int causal_long_keys = 0;

  constexpr bool head_dim_matches(int d) const { return dense.head_dim == d; }
};

constexpr FwdTilePair kFwdTiles[] = {
    // 192 x 128 (3 consumer warpgroups, FA3's hdim-64 tile; the kernel supports it) measured slower on the
    // H200 in every case: dense 0.89-1.00x, causal 0.81-0.97x this tile (NOTES.md, "Head dim 64: 192-row tile").
    // N = 224 for dense calls above 2k keys and causal ones above 4k: fewer block steps per key than N = 128,
    // so less of the per-block fixed cost (barriers, row max / sum reductions). H200, bf16, B * S = 16k, 3
    // alternating rounds (session 8, benchmarks/results/h200_fwd_hd64_*_ab.csv): N = 192 against 128, dense
    // 4k +1 %, 8k +4 %, 16k +5 %, 2k even, 1k -10 % (a ragged last block of 5.3); causal 8k +4.5 %, 16k +6.5 %,
    // 4k -1 %, 2k -3 %. N = 224 against 192: dense 4k +5.5 %, 8k +3 %, 16k +2.5 %; causal 8k +2 %, 16k +4.5 %.
    // N = 256 spills (136-byte stack); N = 160 was below 192.
    {{64, 128, 224, 2}, {64, 128, 128, 2}, 2048, 4096},
    {{96, 128, 128, 2}, {96, 128, 128, 2}},
    // N = 128 (no ragged last block, O in its own staging buffer, two P buffers: FwdTraits::kDoubleP) at
    // every length since session 7: against N = 176 (one P buffer, the softmax behind the P V wait), H200,
    // bf16, B * S = 16k, 3 alternating rounds: dense 2k +3 to +10 %, 4k +0.5 to +8 %, 8k 0 to +5 %, 16k +2
    // to +8 %; causal 4k / 8k +4 to +14 %.
    {{128, 128, 128, 2}, {128, 128, 128, 2}},
    {{192, 128, 112, 2}, {192, 128, 112, 2}},
    {{256, 128, 80, 2}, {256, 128, 80, 2}},
};

// FP8 (e4m3) tiles, head dims 64 / 128 / 256 (others pad up). N is the K dim of the e4m3 P V wgmma
// (a multiple of 32) and the row length, in bytes, of V^T in shared memory.
constexpr FwdTilePair kFwdTilesFp8[] = {
    {{64, 128, 192, 2}, {64, 128, 128, 2}},
    {{128, 128, 192, 2}, {128, 128, 128, 2}},
    {{256, 128, 128, 2}, {256, 128, 128, 2}},
};

// The tile table of a dtype: FP8 has its own.
struct FwdTileTable {
  const FwdTilePair* begin_;
  const FwdTilePair* end_;
  constexpr const FwdTilePair* begin() const { return begin_; }
  constexpr const FwdTilePair* end() const { return end_; }
};
constexpr FwdTileTable fwd_tile_table(bool fp8) {
  return fp8 ? FwdTileTable{kFwdTilesFp8, kFwdTilesFp8 + sizeof(kFwdTilesFp8) / sizeof(kFwdTilesFp8[0])}
             : FwdTileTable{kFwdTiles, kFwdTiles + sizeof(kFwdTiles) / sizeof(kFwdTiles[0])};
}

// Warps of a CTA: one producer warpgroup plus one consumer warpgroup per 64 query rows.
constexpr int fwd_num_warps(const FwdTile& t) { return 4 * (1 + t.block_m / 64); }

}  // namespace flash_attention::sm90
