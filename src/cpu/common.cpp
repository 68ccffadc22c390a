#include "cpu/common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/philox.h"
#include "cpu/simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flash_attention::cpu {
namespace {

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

#if defined(__FLT16_MANT_DIG__)
float half_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
uint16_t float_to_half(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}
#else
float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    mag = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    mag = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &mag, 4);
  bits |= sign;
  std::memcpy(&mag, &bits, 4);
  return mag;
}
uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (a >= 65520.f) return sign | 0x7c00u;
  if (a < 6.103515625e-05f) {  // subnormal: units of 2^-24, round to nearest even
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.f));
  }
  int e;
  const float m = std::frexp(a, &e);                                  // a = m * 2^e, m in [0.5, 1)
  uint32_t mant = static_cast<uint32_t>(std::nearbyint(m * 2048.f));  // 11 bits incl. implicit
  if (mant == 2048) {
    mant = 1024;
    ++e;
  }
  return sign | static_cast<uint16_t>(((e + 14) << 10) | (mant & 0x3ffu));
}
#endif

// Short row copies: an inline vector loop beats a call to memcpy for rows of a few hundred bytes.
void copy_floats(const float* src, int n, float* dst) {
  int c = 0;
  for (; c + kLanes <= n; c += kLanes) vstore(dst + c, vload(src + c));
  for (; c < n; ++c) dst[c] = src[c];
}

}  // namespace

void load_row(DType dtype, const void* src, int n, float* dst) {
  if (dtype == DType::kFloat32) {
    copy_floats(static_cast<const float*>(src), n, dst);
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  if (dtype == DType::kBFloat16) {
    for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
  } else {
    for (int i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
  }
}

void store_row(DType dtype, const float* src, int n, void* dst) {
  if (dtype == DType::kFloat32) {
    copy_floats(src, n, static_cast<float*>(dst));
    return;
  }
  uint16_t* h = static_cast<uint16_t*>(dst);
  if (dtype == DType::kBFloat16) {
    for (int i = 0; i < n; ++i) h[i] = float_to_bf16(src[i]);
  } else {
    for (int i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
  }
}

void load_block(const ForwardParams& p, const RowSource& src, int j0, int Dp, float* block) {
  for (int r = 0; r < kLanes; ++r) {
    float* dst = block + int64_t{r} * Dp;
    const int j = j0 + r;
    int filled = 0;
    if (j < src.rows) {
      load_row(p.dtype, element(src.base, p.dtype, row_offset(p, src.strides, src.b, src.row0, j, src.h)),
               p.head_dim, dst);
      filled = p.head_dim;
    }
    std::fill(dst + filled, dst + Dp, 0.f);
  }
}

void block_to_transposed_panel(const float* block, int D, int Dp, float* panel) {
  for (int c0 = 0; c0 < D; c0 += kLanes) {
    vfloat v[kLanes];
    for (int r = 0; r < kLanes; ++r) v[r] = vload(block + int64_t{r} * Dp + c0);
    transpose16(v);
    for (int c = 0; c < std::min(kLanes, D - c0); ++c) vstore(panel + int64_t{c0 + c} * kLanes, v[c]);
  }
}

void block_to_panels(const float* block, int Dp, int skp, int j0, float* dst) {
  for (int r = 0; r < kLanes; ++r)
    for (int c = 0; c < Dp; c += kLanes)
      vstore(dst + int64_t{c} * skp + int64_t{j0 + r} * kLanes, vload(block + int64_t{r} * Dp + c));
}

namespace {
struct CacheEntry {
  Buffer buffer;
  int64_t floats = 0;
};
thread_local CacheEntry thread_cache[kCacheSlots];
}  // namespace

CachedBuffer::CachedBuffer(int64_t floats, CacheSlot slot) : floats_(floats), slot_(slot) {
  CacheEntry& kept = thread_cache[static_cast<int>(slot)];
  if (kept.floats >= floats) {
    buffer_ = std::move(kept.buffer);
    floats_ = kept.floats;
    kept.floats = 0;
  } else {
    buffer_ = Buffer(floats);
  }
}

CachedBuffer::~CachedBuffer() {
  CacheEntry& kept = thread_cache[static_cast<int>(slot_)];
  if (buffer_.get() != nullptr && floats_ * 4 <= kKeepBytes && floats_ > kept.floats) {
    kept.buffer = std::move(buffer_);
    kept.floats = floats_;
  }
}

StagingBuffer::StagingBuffer(int64_t slot_floats, int groups)
    : slot_floats_(slot_floats),
      chunk_(static_cast<int>(std::clamp<int64_t>(kStagingBytes / 4 / slot_floats, 1, groups))),
      buffer_(chunk_ * slot_floats, CacheSlot::kStaging) {}

Status StagingBuffer::status() const {
  if (buffer_.get() != nullptr) return Status::Ok();
  return Status::Internal("cpu: cannot allocate " + std::to_string(buffer_.floats() * 4) +
                          " bytes of staging memory");
}

int resolve_threads(const ForwardParams& p) {
#ifdef _OPENMP
  const int requested = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#else
  const int requested = 1;
#endif
  const int64_t work = int64_t{p.batch} * p.num_heads * p.seqlen_q * p.seqlen_k * p.head_dim;
  return static_cast<int>(std::clamp<int64_t>(work / kWorkPerThread, 1, requested));
}

float transform_scores(float* s, int ld, int rows, int n, int i0, int j0, const ScoreOps& ops, float* dcap) {
  if (ops.softcap <= 0.f && ops.slope == 0.f) return ops.scale;
  for (int r = 0; r < rows; ++r) {
    float* row = s + int64_t{r} * ld;
    if (ops.softcap > 0.f) {
      const float inv_cap = ops.scale / ops.softcap;
      for (int c = 0; c < n; ++c) {
        const float t = std::tanh(row[c] * inv_cap);
        row[c] = ops.softcap * t;
        if (dcap) dcap[int64_t{r} * ld + c] = 1.f - t * t;
      }
    } else {
      for (int c = 0; c < n; c += kLanes) vstore(row + c, vload(row + c) * ops.scale);
    }
    if (ops.slope != 0.f) {
      const vfloat base = vsplat(static_cast<float>(i0 + r + ops.mask.shift() - j0));
      for (int c = 0; c < n; c += kLanes) {
        const vfloat dist = base - __builtin_convertvector(viota() + c, vfloat);
        const vfloat adist = dist < 0.f ? -dist : dist;
        vstore(row + c, vload(row + c) - ops.slope * adist);
      }
    }
  }
  return 1.f;
}

void mask_scores(float* s, int ld, int rows, int n, int i0, int j0, const Mask& mask) {
  const vfloat neg_inf = vsplat(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < rows; ++r) {
    float* row = s + int64_t{r} * ld;
    const int lo = mask.key_lo(i0 + r) - j0, hi = mask.key_hi(i0 + r) - j0;
    for (int c = 0; c < n; c += kLanes) {
      const vint col = viota() + c;
      vstore(row + c, ((col < lo) | (col > hi)) ? neg_inf : vload(row + c));
    }
  }
}

// j0 is a multiple of 4, so each Philox call serves four consecutive keys (see dropout_keep).
void apply_dropout(float* p, int ld, int rows, int n, int i0, int j0, int64_t bh,
                   const ForwardParams& params) {
  const float keep_scale = 1.f / (1.f - params.dropout_p);
  for (int r = 0; r < rows; ++r) {
    float* row = p + int64_t{r} * ld;
    for (int c = 0; c < n; c += 4) {
      const int64_t j = j0 + c;
      const Philox4 block = dropout_block(params.philox_seed, params.philox_offset, bh, i0 + r, j >> 2);
      const uint32_t words[4] = {block.x, block.y, block.z, block.w};
      for (int w = 0; w < 4; ++w) {
        const bool keep = philox_word_to_uniform(words[w]) >= params.dropout_p;
        row[c + w] = keep ? row[c + w] * keep_scale : 0.f;
      }
    }
  }
}

}  // namespace flash_attention::cpu
