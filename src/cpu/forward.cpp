// CPU forward: blocked online softmax (FlashAttention-2 order), fp32 accumulation, never the full
// S x S matrix. Per (batch, kv head) group, K^T and V are staged in fp32 once; then every query
// block (kBlockM rows of a query head of the group) runs S = Q K^T, the online softmax and
// O = alpha * O + P V over its visible key blocks, up to kSubBlocks query blocks taking each key
// block in turn. OpenMP schedules: see forward() at the bottom.
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
// bookkeeping). Both are multiples of kLanes (kBlockM: see softmax_update).
constexpr int kBlockM = 64;
constexpr int kBlockN = 512;
constexpr int kSubBlocks = 4;        // query blocks per task that share each K / V block from L2
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

// fp32 K^T (D x skp) and V (skp x Dp) of one (b, kv head), both in panel layout (MatB::panels),
// zero padded: each vector column of the products' B operand is one contiguous stream, whatever
// the strides of the caller's tensors.
struct KvView {
  const float* kt;
  const float* v;
};

KvView kv_view(const Dims& d, const float* slot) { return {slot, slot + int64_t{d.D} * d.skp}; }

// Stages keys [j0, j0 + kStageRows) (and the zero padding after the last key).
void stage_kv(const ForwardParams& p, const Dims& d, int b, int hk, int j0, float* slot) {
  const Seq s = seq_of(p, b);
  const RowSource k{p.k, p.k_strides, b, s.k0, s.sk, hk}, v{p.v, p.v_strides, b, s.k0, s.sk, hk};
  float* kt = slot;
  float* vp = slot + int64_t{d.D} * d.skp;
  Buffer block(int64_t{kLanes} * d.Dp);
  for (int j = j0; j < std::min(j0 + kStageRows, round_up(s.sk, kLanes)); j += kLanes) {
    load_block(p, k, j, d.Dp, block.get());
    block_to_transposed_panel(block.get(), d.D, d.Dp, kt + int64_t{j} * d.D);
    load_block(p, v, j, d.Dp, block.get());
    block_to_panels(block.get(), d.Dp, d.skp, j, vp);
  }
}

// Per-thread scratch for up to kSubBlocks query blocks of kBlockM rows: per block Q (converted from
// fp16 / bf16), the O accumulator and the row statistics m, l, alpha; one S / P block shared by all.
struct Work {
  int Dp;
  CachedBuffer mem;
  explicit Work(int Dp_)
      : Dp(Dp_), mem(kBlockM * (kSubBlocks * (2 * int64_t{Dp_} + 3) + kBlockN), CacheSlot::kWork) {}
  float* s() const { return mem.get(); }
  float* sub(int sb) const { return s() + int64_t{kBlockM} * kBlockN + sb * kBlockM * (2 * int64_t{Dp} + 3); }
  float* q(int sb) const { return sub(sb); }
  float* o(int sb) const { return q(sb) + int64_t{kBlockM} * Dp; }
  float* m(int sb) const { return o(sb) + int64_t{kBlockM} * Dp; }
  float* l(int sb) const { return m(sb) + kBlockM; }
  float* alpha(int sb) const { return l(sb) + kBlockM; }
};

// Lane-wise maxima of one row of a block (n keys from j0); with a mask, the row's entries outside
// it become -inf first.
vfloat row_max(float* row, int n, const Mask* mask, int i, int j0) {
  const vfloat neg_inf = vsplat(-std::numeric_limits<float>::infinity());
  if (!mask) {  // four independent chains: one would wait out the latency of each vmax
    vfloat vm[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
    int c = 0;
    for (; c + 4 * kLanes <= n; c += 4 * kLanes)
      for (int u = 0; u < 4; ++u) vm[u] = vmax(vm[u], vload(row + c + u * kLanes));
    for (; c < n; c += kLanes) vm[0] = vmax(vm[0], vload(row + c));
    return vmax(vmax(vm[0], vm[1]), vmax(vm[2], vm[3]));
  }
  vfloat vm = neg_inf;
  const int lo = mask->key_lo(i) - j0, hi = mask->key_hi(i) - j0;
  for (int c = 0; c < n; c += kLanes) {
    const vint col = viota() + c;
    const vfloat x = ((col < lo) | (col > hi)) ? neg_inf : vload(row + c);
    vstore(row + c, x);
    vm = vmax(vm, x);
  }
  return vm;
}

// row = 2^(row * f - shift) in place; returns the lane-wise sums.
vfloat exp_row(float* row, int n, float f, float shift) {
  const vfloat vf = vsplat(f), vshift = vsplat(shift);
  vfloat sum{};
  for (int c = 0; c < n; c += kLanes) {
    const vfloat e = vexp2(vload(row + c) * vf - vshift);
    vstore(row + c, e);
    sum += e;
  }
  return sum;
}

// Lane r of the result = the maximum / sum of the lanes of v[r] (v is clobbered).
vfloat rows_max(vfloat* v) {
  transpose16(v);
  for (int c = 1; c < kLanes; ++c) v[0] = vmax(v[0], v[c]);
  return v[0];
}
vfloat rows_sum(vfloat* v) {
  transpose16(v);
  for (int c = 1; c < kLanes; ++c) v[0] += v[c];
  return v[0];
}

// Online softmax step over one block whose logits are s * factor (entries outside `mask`, when
// given, become -inf): s becomes exp(logit - m_new); m, l updated; alpha = exp(m_old - m_new).
// Rows go in groups of kLanes, so that the per-row reductions and the state update are vector
// operations across the rows of a group (m, l, alpha hold kBlockM entries).
void softmax_update(float* s, int rows, int n, float factor, const Mask* mask, int i0, int j0, float* m,
                    float* l, float* alpha) {
  const vfloat neg_inf = vsplat(-std::numeric_limits<float>::infinity());
  for (int r0 = 0; r0 < rows; r0 += kLanes) {
    const int nr = std::min(kLanes, rows - r0);
    float* block = s + int64_t{r0} * kBlockN;
    vfloat part[kLanes];
    for (int r = 0; r < kLanes; ++r)
      part[r] = r < nr ? row_max(block + r * kBlockN, n, mask, i0 + r0 + r, j0) : neg_inf;
    const vfloat m_old = vload(m + r0);
    const vfloat m_new = vmax(m_old, rows_max(part) * factor);
    // Rows with nothing visible yet (m_new = -inf) keep their state: P = 0, alpha = 1.
    const vfloat a = m_new == neg_inf ? vsplat(1.f) : vexp2((m_old - m_new) * kLog2e);
    for (int r = 0; r < kLanes; ++r) {
      float* row = block + r * kBlockN;
      part[r] = vfloat{};
      if (r >= nr) continue;
      if (m_new[r] == neg_inf[0]) {
        std::fill(row, row + n, 0.f);
      } else {
        part[r] = exp_row(row, n, factor * kLog2e, m_new[r] * kLog2e);
      }
    }
    vstore(l + r0, vload(l + r0) * a + rows_sum(part));
    vstore(m + r0, m_new);
    vstore(alpha + r0, a);
  }
}

// One query block of a task: rows [i0, i0 + rows) of (b, h), its Q and its slice of the Work.
struct QueryBlock {
  int i0, rows;
  const float* q;
  int64_t q_ld;
  int sb;  // Work slot
};

// fp32 Q is read in place, other dtypes are converted into the block's Work slot.
QueryBlock query_block(const ForwardParams& p, const Dims& d, int b, const Seq& s, int h, int i0, int sb,
                       Work& w) {
  const int rows = std::min(kBlockM, s.sq - i0);
  if (p.dtype == DType::kFloat32)
    return {i0, rows, static_cast<const float*>(p.q) + row_offset(p, p.q_strides, b, s.q0, i0, h),
            p.q_strides.row, sb};
  for (int r = 0; r < rows; ++r) {
    float* dst = w.q(sb) + int64_t{r} * d.Dp;
    load_row(p.dtype, element(p.q, p.dtype, row_offset(p, p.q_strides, b, s.q0, i0 + r, h)), d.D, dst);
    std::fill(dst + d.D, dst + d.Dp, 0.f);
  }
  return {i0, rows, w.q(sb), d.Dp, sb};
}

// out = o / l, lse = m + log(l); rows that saw no key: out = 0, lse = +inf.
void store_out(const ForwardParams& p, const Dims& d, int b, const Seq& s, int h, const QueryBlock& qb,
               Work& w) {
  for (int r = 0; r < qb.rows; ++r) {
    float* o = w.o(qb.sb) + int64_t{r} * d.Dp;
    const float l = w.l(qb.sb)[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int c = 0; c < d.D; ++c) o[c] *= inv;
    store_row(p.dtype, o, d.D, element(p.out, p.dtype, row_offset(p, p.out_strides, b, s.q0, qb.i0 + r, h)));
    p.softmax_lse[lse_offset(p, s, b, h, qb.i0 + r)] =
        l > 0.f ? w.m(qb.sb)[r] + std::log(l) : std::numeric_limits<float>::infinity();
  }
}

// Keys [j0, j0 + n) for one query block: S = Q K^T, online softmax, O = alpha * O + P V.
void attend(const ForwardParams& p, const Dims& d, int64_t bh, const ScoreOps& ops, const QueryBlock& qb,
            int j0, int n, const KvView& kv, Work& w) {
  const int i1 = qb.i0 + qb.rows - 1;
  float* o = w.o(qb.sb);
  const float* alpha = w.alpha(qb.sb);
  gemm(qb.rows, n, d.D, qb.q, qb.q_ld, 1, MatB::panels(kv.kt, d.D, j0), w.s(), kBlockN, false);
  const float factor = transform_scores(w.s(), kBlockN, qb.rows, n, qb.i0, j0, ops, nullptr);
  const bool masked = !ops.mask.covers(qb.i0, i1, j0, j0 + n - 1);
  softmax_update(w.s(), qb.rows, n, factor, masked ? &ops.mask : nullptr, qb.i0, j0, w.m(qb.sb), w.l(qb.sb),
                 w.alpha(qb.sb));
  if (p.dropout_p > 0.f) apply_dropout(w.s(), kBlockN, qb.rows, n, qb.i0, j0, bh, p);
  gemm(qb.rows, d.Dp, n, w.s(), kBlockN, 1, MatB::panels(kv.v, d.skp, 0).from_row(j0), o, d.Dp, true, alpha);
}

// Query rows [i0, i0 + nsub * kBlockM) of (b, h) as nsub query blocks that take the key blocks
// in turn (each kBlockN-key slice of K^T and V is then read from L2 by all of them). Key blocks
// sit on a fixed grid (multiples of kBlockN), each trimmed to the query block's visible keys
// [lo, hi] rounded out to kLanes, so causal / local masks skip dead keys and the sums do not
// depend on how blocks are grouped into tasks.
void forward_rows(const ForwardParams& p, const Dims& d, int b, int h, int i0, int nsub, const KvView& kv,
                  Work& w) {
  const Seq s = seq_of(p, b);
  const ScoreOps ops = score_ops(p, s, b, h);
  QueryBlock blocks[kSubBlocks];
  int nb = 0, hi_all = -1;
  for (int sb = 0; sb < nsub && i0 + sb * kBlockM < s.sq; ++sb, ++nb) {
    blocks[sb] = query_block(p, d, b, s, h, i0 + sb * kBlockM, sb, w);
    std::fill(w.o(sb), w.o(sb) + int64_t{blocks[sb].rows} * d.Dp, 0.f);
    std::fill(w.m(sb), w.m(sb) + kBlockM, -std::numeric_limits<float>::infinity());
    std::fill(w.l(sb), w.l(sb) + kBlockM, 0.f);
    hi_all = std::max(hi_all, ops.mask.key_hi(blocks[sb].i0 + blocks[sb].rows - 1));
  }
  const int64_t bh = int64_t{b} * p.num_heads + h;
  for (int j0 = 0; j0 <= hi_all; j0 += kBlockN) {
    for (int k = 0; k < nb; ++k) {
      const QueryBlock& qb = blocks[k];
      const int lo = ops.mask.key_lo(qb.i0), hi = ops.mask.key_hi(qb.i0 + qb.rows - 1);
      const int jb = std::max(j0, lo / kLanes * kLanes),
                je = std::min(j0 + kBlockN, round_up(hi + 1, kLanes));
      if (jb < je) attend(p, d, bh, ops, qb, jb, je - jb, kv, w);
    }
  }
  for (int k = 0; k < nb; ++k) store_out(p, d, b, s, h, blocks[k], w);
}

// Stages group g (= b * Hk + hk) and runs all its query heads and blocks: one task, no barrier.
void forward_group(const ForwardParams& p, const Dims& d, int g, float* slot, Work& w) {
  const int b = g / p.num_heads_k, hk = g % p.num_heads_k;
  for (int j0 = 0; j0 < d.skp; j0 += kStageRows) stage_kv(p, d, b, hk, j0, slot);
  const int sq = seq_of(p, b).sq;
  for (int hg = 0; hg < d.group; ++hg)
    for (int i0 = 0; i0 < sq; i0 += kSubBlocks * kBlockM)
      forward_rows(p, d, b, hk * d.group + hg, i0, kSubBlocks, kv_view(d, slot), w);
}

}  // namespace

// Two schedules per chunk of (batch, kv head) groups. With at least kGroupsPerThread groups per
// thread, one task per group (staging + compute, no barrier in between: robust when threads get
// descheduled). Otherwise staging tasks over (group, key rows), then compute tasks over
// (group, query head, query rows) for more parallelism.
Status forward(const ForwardParams& p) {
  const Dims d = dims_of(p);
  const int groups = p.batch * p.num_heads_k;
  StagingBuffer staging(d.slot_floats(), groups);
  FA_RETURN_IF_ERROR(staging.status());
  const int chunk = staging.chunk();
  [[maybe_unused]] const int threads = resolve_threads(p);
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
        // Tasks of nsub query blocks: as many as keep about 8 tasks per thread.
        const int nsub = static_cast<int>(
            std::clamp<int64_t>(int64_t{ng} * d.group * d.nqb / (8 * threads), 1, kSubBlocks));
        const int ntasks = (d.nqb + nsub - 1) / nsub;
#pragma omp for schedule(dynamic) nowait
        for (int64_t it = 0; it < int64_t{ng} * d.group * ntasks; ++it) {
          const int i0 =
              (ntasks - 1 - static_cast<int>(it % ntasks)) * nsub * kBlockM;  // longest (causal) first
          const int64_t rest = it / ntasks;
          const int g = static_cast<int>(rest / d.group);
          const int b = (g0 + g) / p.num_heads_k, hk = (g0 + g) % p.num_heads_k;
          const int h = hk * d.group + static_cast<int>(rest % d.group);
          if (i0 < seq_of(p, b).sq) forward_rows(p, d, b, h, i0, nsub, kv_view(d, slot_of(g)), w);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace flash_attention::cpu
