// Default sm80-path forward config per (arch, head-dim specialisation, dtype, masked), where masked =
// causal or sliding window. tools/autotune.py rewrites the rows between the markers from device sweeps
// (its comment says which rows were measured). The dispatch uses the row of the device's arch, else of
// the nearest lower arch in the table; a config that was not built or does not fit the device's shared
// memory falls back to the first built config that fits.
#pragma once

#include "flash_attention/flash_attention.h"

namespace flash_attention::sm80 {

struct DefaultTile {
  int arch;
  int head_dim;
  DType dtype;
  bool masked;
  const char* config;
};

// BEGIN DEFAULT TILES (tools/autotune.py)
// sm90 rows measured on h200 by tools/autotune.py; other rows are unmeasured guesses.
inline constexpr DefaultTile kDefaultTiles[] = {
    {80, 32, DType::kBFloat16, false, "sm80:m128n64w4s2"},
    {80, 32, DType::kBFloat16, true, "sm80:m128n64w4s2"},
    {80, 32, DType::kFloat16, false, "sm80:m128n64w4s2"},
    {80, 32, DType::kFloat16, true, "sm80:m128n64w4s2"},
    {80, 64, DType::kBFloat16, false, "sm80:m128n64w4s2"},
    {80, 64, DType::kBFloat16, true, "sm80:m128n64w4s2"},
    {80, 64, DType::kFloat16, false, "sm80:m128n64w4s2"},
    {80, 64, DType::kFloat16, true, "sm80:m128n64w4s2"},
    {80, 96, DType::kBFloat16, false, "sm80:m128n64w8s2"},
    {80, 96, DType::kBFloat16, true, "sm80:m128n64w8s2"},
    {80, 96, DType::kFloat16, false, "sm80:m128n64w8s2"},
    {80, 96, DType::kFloat16, true, "sm80:m128n64w8s2"},
    {80, 128, DType::kBFloat16, false, "sm80:m128n64w4s2"},
    {80, 128, DType::kBFloat16, true, "sm80:m128n64w4s2"},
    {80, 128, DType::kFloat16, false, "sm80:m128n64w4s2"},
    {80, 128, DType::kFloat16, true, "sm80:m128n64w4s2"},
    {80, 192, DType::kBFloat16, false, "sm80:m128n64w8s2"},
    {80, 192, DType::kBFloat16, true, "sm80:m128n64w8s2"},
    {80, 192, DType::kFloat16, false, "sm80:m128n64w8s2"},
    {80, 192, DType::kFloat16, true, "sm80:m128n64w8s2"},
    {80, 256, DType::kBFloat16, false, "sm80:m64n32w4s2"},
    {80, 256, DType::kBFloat16, true, "sm80:m64n32w4s2"},
    {80, 256, DType::kFloat16, false, "sm80:m64n32w4s2"},
    {80, 256, DType::kFloat16, true, "sm80:m64n32w4s2"},
    {90, 64, DType::kBFloat16, false, "sm80:m128n64w4s2"},
    {90, 64, DType::kBFloat16, true, "sm80:m128n64w4s2"},
    {90, 64, DType::kFloat16, false, "sm80:m128n64w4s2"},
    {90, 64, DType::kFloat16, true, "sm80:m128n64w4s2"},
    {90, 128, DType::kBFloat16, false, "sm80:m128n64w4s2"},
    {90, 128, DType::kBFloat16, true, "sm80:m128n64w4s2"},
    {90, 128, DType::kFloat16, false, "sm80:m128n64w4s2"},
    {90, 128, DType::kFloat16, true, "sm80:m128n64w4s2"},
    {90, 256, DType::kBFloat16, false, "sm80:m128n64w8s2"},
    {90, 256, DType::kBFloat16, true, "sm80:m64n32w4s2"},
    {90, 256, DType::kFloat16, false, "sm80:m128n64w8s2"},
    {90, 256, DType::kFloat16, true, "sm80:m64n32w4s2"},
};
// END DEFAULT TILES

}  // namespace flash_attention::sm80
