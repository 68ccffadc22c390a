// CPU forward: blocked online softmax (FlashAttention-2 order), fp32 accumulation, never the full
// S x S matrix. Per (batch, kv head) group, K^T and V are staged in fp32 once; then every
// (query head of the group, query block) runs S = Q K^T, the online softmax and O += P V over its
// visible key blocks. OpenMP schedules: see forward() at the bottom.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "cpu/common.h"
#include "cpu/cpu_attention.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace flash_attention::cpu {
namespace {

// Query rows x keys per block (tuned on AVX-512: a wider key block amortises the per-row softmax
// bookkeeping; kBlockN is a multiple of kLanes).
constexpr int kBlockM = 64;
constexpr int kBlockN = 256;
constexpr int kStageRows = 256;      // keys per staging task (a multiple of kLanes)
constexpr int kGroupsPerThread = 2;  // per-group schedule from this many groups per thread

struct Dims {
  int D, Dp;  // head dim, padded to kLanes
  int group;  // query heads per kv head
  int skp;    // longest key sequence, padded to kLanes
  int nqb;    // query blocks of the longest query sequence
  int64_t slot_floats() const { return std::max<int64_t>(1, int64_t{skp} * (D + Dp)); }
};

Dims dims_of(const ForwardParams& p) {
  return {p.head_dim, round_up(p.head_dim, kLanes), p.num_heads / p.num_heads_k, round_up(p.seqlen_k, kLanes),
          (p.seqlen_q + kBlockM - 1) / kBlockM};
}

// fp32 K^T (D x skp, panel layout) and V (skp x Dp) of one (b, kv head), zero padded. V is
// staged even for fp32: rows of the caller's tensor are often a power-of-two stride apart, and
// streaming them in the P V product would thrash L1 sets.
struct KvView {
  const float* kt;
  const float* v;
};

KvView kv_view(const Dims& d, const float* slot) { return {slot, slot + int64_t{d.D} * d.skp}; }

// Stages keys [j0, j0 + kStageRows) (and the zero padding after the last key).
void stage_kv(const ForwardParams& p, const Dims& d, int b, int hk, int j0, float* slot) {
  const Seq s = seq_of(p, b);
  float* kt = slot;
  float* v = slot + int64_t{d.D} * d.skp;
  Buffer tmp(d.Dp);
  const int j1 = std::min(j0 + kStageRows, round_up(s.sk, kLanes));
  for (int j = j0; j < std::min(j1, s.sk); ++j) {
    load_row(p.dtype, element(p.k, p.dtype, row_offset(p, p.k_strides, b, s.k0, j, hk)), d.D, tmp.get());
    for (int c = 0; c < d.D; ++c) kt[panel_index(j, c, d.D)] = tmp.get()[c];
    float* vrow = v + int64_t{j} * d.Dp;
    load_row(p.dtype, element(p.v, p.dtype, row_offset(p, p.v_strides, b, s.k0, j, hk)), d.D, vrow);
    std::fill(vrow + d.D, vrow + d.Dp, 0.f);
  }
  for (int j = std::max(j0, s.sk); j < j1; ++j) {
    for (int c = 0; c < d.D; ++c) kt[panel_index(j, c, d.D)] = 0.f;
    std::fill(v + int64_t{j} * d.Dp, v + int64_t{j + 1} * d.Dp, 0.f);
  }
}

// Per-thread scratch for one query block.
struct Work {
  Buffer q, o, s, stats;
  explicit Work(int Dp)
      : q(int64_t{kBlockM} * Dp),
        o(int64_t{kBlockM} * Dp),
        s(int64_t{kBlockM} * kBlockN),
        stats(3 * kBlockM) {}
  float* m() const { return stats.get(); }
  float* l() const { return stats.get() + kBlockM; }
  float* alpha() const { return stats.get() + 2 * kBlockM; }
};

// Online softmax step over one block whose logits are s * factor (entries outside `mask`, when
// given, are -inf): s becomes exp(logit - m_new); m, l updated; alpha = exp(m_old - m_new).
void softmax_update(float* s, int rows, int n, float factor, const Mask* mask, int i0, int j0, float* m,
                    float* l, float* alpha) {
  const vfloat neg_inf = vsplat(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < rows; ++r) {
    float* row = s + int64_t{r} * kBlockN;
    vfloat vm = neg_inf;
    if (mask) {
      const int lo = mask->key_lo(i0 + r) - j0, hi = mask->key_hi(i0 + r) - j0;
      for (int c = 0; c < n; c += kLanes) {
        const vint col = viota() + c;
        const vfloat x = ((col < lo) | (col > hi)) ? neg_inf : vload(row + c);
        vstore(row + c, x);
        vm = vmax(vm, x);
      }
    } else {
      for (int c = 0; c < n; c += kLanes) vm = vmax(vm, vload(row + c));
    }
    const float m_new = std::max(m[r], hmax(vm) * factor);
    if (m_new == neg_inf[0]) {  // nothing visible yet: P = 0, state unchanged
      std::fill(row, row + n, 0.f);
      alpha[r] = 1.f;
      continue;
    }
    alpha[r] = std::exp(m[r] - m_new);
    const vfloat f = vsplat(factor * kLog2e), shift = vsplat(m_new * kLog2e);
    vfloat sum{};
    for (int c = 0; c < n; c += kLanes) {
      const vfloat e = vexp2(vload(row + c) * f - shift);
      vstore(row + c, e);
      sum += e;
    }
    l[r] = l[r] * alpha[r] + hsum(sum);
    m[r] = m_new;
  }
}

void load_q(const ForwardParams& p, const Dims& d, int b, const Seq& s, int h, int i0, int rows, float* q) {
  for (int r = 0; r < rows; ++r) {
    float* dst = q + int64_t{r} * d.Dp;
    load_row(p.dtype, element(p.q, p.dtype, row_offset(p, p.q_strides, b, s.q0, i0 + r, h)), d.D, dst);
    std::fill(dst + d.D, dst + d.Dp, 0.f);
  }
}

// out = o / l, lse = m + log(l); rows that saw no key: out = 0, lse = +inf.
void store_out(const ForwardParams& p, const Dims& d, int b, const Seq& s, int h, int i0, int rows, Work& w) {
  for (int r = 0; r < rows; ++r) {
    float* o = w.o.get() + int64_t{r} * d.Dp;
    const float l = w.l()[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int c = 0; c < d.D; ++c) o[c] *= inv;
    store_row(p.dtype, o, d.D, element(p.out, p.dtype, row_offset(p, p.out_strides, b, s.q0, i0 + r, h)));
    p.softmax_lse[lse_offset(p, s, b, h, i0 + r)] =
        l > 0.f ? w.m()[r] + std::log(l) : std::numeric_limits<float>::infinity();
  }
}

void forward_block(const ForwardParams& p, const Dims& d, int b, int h, int i0, const KvView& kv, Work& w) {
  const Seq s = seq_of(p, b);
  const int rows = std::min(kBlockM, s.sq - i0);
  const ScoreOps ops = score_ops(p, s, b, h);
  const Mask& mask = ops.mask;
  const float* q = w.q.get();  // fp32 q is read in place, other dtypes converted
  int64_t q_ld = d.Dp;
  if (p.dtype == DType::kFloat32) {
    q = static_cast<const float*>(p.q) + row_offset(p, p.q_strides, b, s.q0, i0, h);
    q_ld = p.q_strides.row;
  } else {
    load_q(p, d, b, s, h, i0, rows, w.q.get());
  }
  std::fill(w.o.get(), w.o.get() + int64_t{rows} * d.Dp, 0.f);
  std::fill(w.m(), w.m() + rows, -std::numeric_limits<float>::infinity());
  std::fill(w.l(), w.l() + rows, 0.f);
  const int i1 = i0 + rows - 1;
  const int lo = mask.key_lo(i0), hi = mask.key_hi(i1);
  const int64_t bh = int64_t{b} * p.num_heads + h;
  // Key blocks cover [lo, hi] only (multiples of kLanes), so causal / local masks skip dead keys.
  for (int j0 = lo / kLanes * kLanes; j0 <= hi; j0 += kBlockN) {
    const int n = std::min(kBlockN, round_up(hi + 1, kLanes) - j0);
    gemm(rows, n, d.D, q, q_ld, 1, MatB::panels(kv.kt, d.D, j0), w.s.get(), kBlockN, false);
    const float factor = transform_scores(w.s.get(), kBlockN, rows, n, i0, j0, ops, nullptr);
    const bool masked = !mask.covers(i0, i1, j0, j0 + n - 1);
    softmax_update(w.s.get(), rows, n, factor, masked ? &mask : nullptr, i0, j0, w.m(), w.l(), w.alpha());
    if (p.dropout_p > 0.f) apply_dropout(w.s.get(), kBlockN, rows, n, i0, j0, bh, p);
    for (int r = 0; r < rows; ++r) {
      if (w.alpha()[r] == 1.f) continue;
      float* o = w.o.get() + int64_t{r} * d.Dp;
      for (int c = 0; c < d.Dp; c += kLanes) vstore(o + c, vload(o + c) * w.alpha()[r]);
    }
    gemm(rows, d.Dp, n, w.s.get(), kBlockN, 1, MatB::row_major(kv.v + int64_t{j0} * d.Dp, d.Dp), w.o.get(),
         d.Dp, true);
  }
  store_out(p, d, b, s, h, i0, rows, w);
}

// Stages group g (= b * Hk + hk) and runs all its query heads and blocks: one task, no barrier.
void forward_group(const ForwardParams& p, const Dims& d, int g, float* slot, Work& w) {
  const int b = g / p.num_heads_k, hk = g % p.num_heads_k;
  for (int j0 = 0; j0 < d.skp; j0 += kStageRows) stage_kv(p, d, b, hk, j0, slot);
  const int sq = seq_of(p, b).sq;
  for (int hg = 0; hg < d.group; ++hg)
    for (int i0 = 0; i0 < sq; i0 += kBlockM)
      forward_block(p, d, b, hk * d.group + hg, i0, kv_view(d, slot), w);
}

}  // namespace

// Two schedules per chunk of (batch, kv head) groups. With at least kGroupsPerThread groups per
// thread, one task per group (staging + compute, no barrier in between: robust when threads get
// descheduled). Otherwise staging tasks over (group, key rows), then compute tasks over
// (group, query head, query block) for more parallelism.
Status forward(const ForwardParams& p) {
  const Dims d = dims_of(p);
  const int groups = p.batch * p.num_heads_k;
  StagingBuffer staging(d.slot_floats(), groups);
  FA_RETURN_IF_ERROR(staging.status());
  const int chunk = staging.chunk();
  [[maybe_unused]] const int threads = resolve_threads(p.num_threads);
  for (int g0 = 0; g0 < groups; g0 += chunk) {
    const int ng = std::min(chunk, groups - g0);
    const bool per_group = ng >= kGroupsPerThread * threads;
    auto slot_of = [&](int g) { return staging.slot(g); };
#pragma omp parallel num_threads(threads)
    {
      Work w(d.Dp);
      if (per_group) {
#pragma omp for schedule(dynamic) nowait
        for (int g = 0; g < ng; ++g) forward_group(p, d, g0 + g, slot_of(g), w);
      } else {
        const int stage_items = (d.skp + kStageRows - 1) / kStageRows;
#pragma omp for schedule(dynamic)
        for (int64_t it = 0; it < int64_t{ng} * stage_items; ++it) {
          const int g = static_cast<int>(it / stage_items);
          stage_kv(p, d, (g0 + g) / p.num_heads_k, (g0 + g) % p.num_heads_k,
                   static_cast<int>(it % stage_items) * kStageRows, slot_of(g));
        }
        const int64_t items = int64_t{ng} * d.group * d.nqb;
#pragma omp for schedule(dynamic) nowait
        for (int64_t it = 0; it < items; ++it) {
          const int qb = d.nqb - 1 - static_cast<int>(it % d.nqb);  // longest (causal) blocks first
          const int64_t rest = it / d.nqb;
          const int g = static_cast<int>(rest / d.group);
          const int b = (g0 + g) / p.num_heads_k, hk = (g0 + g) % p.num_heads_k;
          const int h = hk * d.group + static_cast<int>(rest % d.group);
          if (qb * kBlockM < seq_of(p, b).sq)
            forward_block(p, d, b, h, qb * kBlockM, kv_view(d, slot_of(g)), w);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace flash_attention::cpu
