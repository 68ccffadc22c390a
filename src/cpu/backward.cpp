// CPU backward (FlashAttention-2 algorithm), deterministic by construction: no two threads ever
// write the same dq/dk/dv row. P is recomputed from the forward's softmax_lse, D = rowsum(dO * O),
// dS = P * (dP - D). Two schedules, chosen by how many (batch, kv head) groups there are per thread:
//   fused (many groups): one task per group walks its key blocks in order and accumulates
//          dV += P^T dO, dK += dS^T Q and dQ += dS K (5 block products per block pair);
//   split (few groups):  pass A, parallel over (group, key block), does dV and dK; pass B,
//          parallel over (head, query block), recomputes dS and does dQ (7 products, more tasks).
// Both visit key blocks in the same (ascending, kBlockN-aligned) order and sum every product in
// the same order, so they give bit-identical results: the output never depends on the thread count.
#include <algorithm>
#include <cmath>
#include <string>

#include "common/philox.h"
#include "cpu/common.h"
#include "cpu/cpu_attention.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace flash_attention::cpu {
namespace {

// Query rows x keys per block (the dK/dV accumulators of a key block stay in L2 at 128).
constexpr int kBlockM = 64;
constexpr int kBlockN = 128;
constexpr int kStageRows = 256;  // rows per staging task (a multiple of kLanes)

// The fused schedule needs this many (batch, kv head) groups per thread to balance the load.
constexpr int kFusedGroupsPerThread = 2;

struct Dims {
  int D, Dp, group, skp, sq, nqb, nkb;
  // Per (b, kv head): K (skp x Dp), K^T and V^T (D x skp), all three in panel layout (MatB::panels);
  // per query head: Q, dO, dQ accumulator (sq x Dp), D = rowsum(dO * O), lse.
  int64_t kv_floats() const { return int64_t{skp} * (Dp + 2 * D); }
  int64_t head_floats() const { return int64_t{sq} * (3 * Dp + 2); }
  int64_t slot_floats() const { return std::max<int64_t>(1, kv_floats() + group * head_floats()); }
};

Dims dims_of(const BackwardParams& p) {
  Dims d;
  d.D = p.head_dim;
  d.Dp = round_up(p.head_dim, kLanes);
  d.group = p.num_heads / p.num_heads_k;
  d.skp = round_up(p.seqlen_k, kLanes);
  d.sq = p.seqlen_q;
  d.nqb = (p.seqlen_q + kBlockM - 1) / kBlockM;
  d.nkb = (d.skp + kBlockN - 1) / kBlockN;
  return d;
}

// Views into one group's staging slot.
struct GroupData {
  float *k, *kt, *vt;
  GroupData(float* slot, const Dims& d)
      : k(slot), kt(slot + int64_t{d.skp} * d.Dp), vt(kt + int64_t{d.D} * d.skp) {}
};
struct HeadData {
  float *q, *dout, *dq, *delta, *lse;
  HeadData(float* slot, const Dims& d, int hg) {
    q = slot + d.kv_floats() + hg * d.head_floats();
    dout = q + int64_t{d.sq} * d.Dp;
    dq = dout + int64_t{d.sq} * d.Dp;
    delta = dq + int64_t{d.sq} * d.Dp;
    lse = delta + d.sq;
  }
};

// Staging tasks cover kStageRows rows each: keys [j0, j0 + kStageRows) incl. zero padding, or
// query rows [i0, i0 + kStageRows) of one head.
void stage_kv(const BackwardParams& p, const Dims& d, int b, int hk, int j0, const GroupData& g) {
  const Seq s = seq_of(p, b);
  const RowSource k{p.k, p.k_strides, b, s.k0, s.sk, hk}, v{p.v, p.v_strides, b, s.k0, s.sk, hk};
  Buffer block(int64_t{kLanes} * d.Dp);
  for (int j = j0; j < std::min(j0 + kStageRows, round_up(s.sk, kLanes)); j += kLanes) {
    load_block(p, k, j, d.Dp, block.get());
    block_to_panels(block.get(), d.Dp, d.skp, j, g.k);
    block_to_transposed_panel(block.get(), d.D, d.Dp, g.kt + int64_t{j} * d.D);
    load_block(p, v, j, d.Dp, block.get());
    block_to_transposed_panel(block.get(), d.D, d.Dp, g.vt + int64_t{j} * d.D);
  }
}

void stage_head(const BackwardParams& p, const Dims& d, int b, int h, int i0, const HeadData& hd) {
  const Seq s = seq_of(p, b);
  Buffer o(d.Dp);
  for (int i = i0; i < std::min(i0 + kStageRows, s.sq); ++i) {
    float* q = hd.q + int64_t{i} * d.Dp;
    float* dout = hd.dout + int64_t{i} * d.Dp;
    load_row(p.dtype, element(p.q, p.dtype, row_offset(p, p.q_strides, b, s.q0, i, h)), d.D, q);
    load_row(p.dtype, element(p.dout, p.dtype, row_offset(p, p.dout_strides, b, s.q0, i, h)), d.D, dout);
    load_row(p.dtype, element(p.out, p.dtype, row_offset(p, p.out_strides, b, s.q0, i, h)), d.D, o.get());
    std::fill(q + d.D, q + d.Dp, 0.f);
    std::fill(dout + d.D, dout + d.Dp, 0.f);
    std::fill(o.get() + d.D, o.get() + d.Dp, 0.f);
    std::fill(hd.dq + int64_t{i} * d.Dp, hd.dq + int64_t{i + 1} * d.Dp, 0.f);
    vfloat delta{};
    for (int c = 0; c < d.Dp; c += kLanes) delta += vload(dout + c) * vload(o.get() + c);
    hd.delta[i] = hsum(delta);
    hd.lse[i] = p.softmax_lse[lse_offset(p, s, b, h, i)];
  }
}

// Per-thread scratch: P (or dropped P), dP -> dS, softcap derivative (kBlockM x kBlockN each), the
// dK | dQ accumulator and the dV accumulator.
struct Work {
  static constexpr int64_t kTile = int64_t{kBlockM} * kBlockN;
  int64_t acc_floats;
  CachedBuffer mem;
  explicit Work(int Dp)
      : acc_floats(int64_t{std::max(kBlockM, kBlockN)} * Dp),
        mem(3 * kTile + 2 * acc_floats, CacheSlot::kWork) {}
  float* s() const { return mem.get(); }
  float* dp() const { return s() + kTile; }
  float* dcap() const { return dp() + kTile; }
  float* acc_a() const { return dcap() + kTile; }
  float* acc_b() const { return acc_a() + acc_floats; }
};

// Query rows [i0, i0 + rows) x keys [j0, j0 + n).
struct Block {
  int i0, rows, j0, n;
};

// With dropout: dS = P * (dP * keep / (1 - p) - D), and s becomes the dropped P (for dV).
void dropout_ds(const BackwardParams& p, const Block& blk, int64_t bh, const float* delta, Work& w) {
  const float scale = 1.f / (1.f - p.dropout_p);
  for (int r = 0; r < blk.rows; ++r) {
    float* s = w.s() + int64_t{r} * kBlockN;
    float* dp = w.dp() + int64_t{r} * kBlockN;
    for (int c = 0; c < blk.n; c += 4) {
      const Philox4 bits = dropout_block(p.philox_seed, p.philox_offset, bh, blk.i0 + r, (blk.j0 + c) >> 2);
      const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
      for (int k = 0; k < 4; ++k) {
        const bool keep = philox_word_to_uniform(words[k]) >= p.dropout_p;
        const float prob = s[c + k];
        dp[c + k] = prob * ((keep ? dp[c + k] * scale : 0.f) - delta[r]);
        s[c + k] = keep ? prob * scale : 0.f;
      }
    }
  }
}

// For one block: w.s = P (dropped and rescaled under dropout), w.dp = dS (times the softcap
// derivative when softcap is on).
void compute_ds(const BackwardParams& p, const Dims& d, const GroupData& g, const HeadData& hd,
                const ScoreOps& ops, const Block& blk, int64_t bh, Work& w) {
  const bool masked = !ops.mask.covers(blk.i0, blk.i0 + blk.rows - 1, blk.j0, blk.j0 + blk.n - 1);
  gemm(blk.rows, blk.n, d.D, hd.q + int64_t{blk.i0} * d.Dp, d.Dp, 1, MatB::panels(g.kt, d.D, blk.j0), w.s(),
       kBlockN, false);
  const float factor = transform_scores(w.s(), kBlockN, blk.rows, blk.n, blk.i0, blk.j0, ops,
                                        ops.softcap > 0.f ? w.dcap() : nullptr);
  if (masked) mask_scores(w.s(), kBlockN, blk.rows, blk.n, blk.i0, blk.j0, ops.mask);
  gemm(blk.rows, blk.n, d.D, hd.dout + int64_t{blk.i0} * d.Dp, d.Dp, 1, MatB::panels(g.vt, d.D, blk.j0),
       w.dp(), kBlockN, false);
  // P = exp(logit - lse); without dropout dS = P * (dP - D) in the same pass.
  for (int r = 0; r < blk.rows; ++r) {
    float* s = w.s() + int64_t{r} * kBlockN;
    float* dp = w.dp() + int64_t{r} * kBlockN;
    const vfloat f = vsplat(factor * kLog2e), lse = vsplat(hd.lse[blk.i0 + r] * kLog2e);
    const vfloat delta = vsplat(hd.delta[blk.i0 + r]);
    if (p.dropout_p > 0.f) {
      for (int c = 0; c < blk.n; c += kLanes) vstore(s + c, vexp2(vload(s + c) * f - lse));
      continue;
    }
    for (int c = 0; c < blk.n; c += kLanes) {
      const vfloat prob = vexp2(vload(s + c) * f - lse);
      vstore(s + c, prob);
      vstore(dp + c, prob * (vload(dp + c) - delta));
    }
  }
  if (p.dropout_p > 0.f) dropout_ds(p, blk, bh, hd.delta + blk.i0, w);
  if (ops.softcap > 0.f) {
    for (int r = 0; r < blk.rows; ++r) {
      float* dp = w.dp() + int64_t{r} * kBlockN;
      const float* dc = w.dcap() + int64_t{r} * kBlockN;
      for (int c = 0; c < blk.n; c += kLanes) vstore(dp + c, vload(dp + c) * vload(dc + c));
    }
  }
}

// Scales accumulator rows in place (they are dead afterwards) and stores them.
void store_rows(const BackwardParams& p, const Dims& d, float* acc, int rows, float scale, void* base,
                const TensorStrides& strides, int b, int64_t row0, int first, int h) {
  for (int r = 0; r < rows; ++r) {
    float* src = acc + int64_t{r} * d.Dp;
    for (int c = 0; c < d.Dp; c += kLanes) vstore(src + c, vload(src + c) * scale);
    store_row(p.dtype, src, d.D, element(base, p.dtype, row_offset(p, strides, b, row0, first + r, h)));
  }
}

// dK, dV of keys [j0, j0 + kBlockN) of (b, hk); with_dq also adds this key block's share of dQ
// to the heads' dQ accumulators (fused schedule).
void dkdv_block(const BackwardParams& p, const Dims& d, int b, int hk, int j0, float* slot, Work& w,
                bool with_dq) {
  const Seq s = seq_of(p, b);
  if (j0 >= s.sk) return;
  const int n = std::min(kBlockN, round_up(s.sk, kLanes) - j0);
  const int j1 = std::min(j0 + n, s.sk) - 1;
  const GroupData g(slot, d);
  std::fill(w.acc_a(), w.acc_a() + int64_t{n} * d.Dp, 0.f);
  std::fill(w.acc_b(), w.acc_b() + int64_t{n} * d.Dp, 0.f);
  for (int hg = 0; hg < d.group; ++hg) {
    const int h = hk * d.group + hg;
    const HeadData hd(slot, d, hg);
    const ScoreOps ops = score_ops(p, s, b, h);
    const int ilo = ops.mask.query_lo(j0), ihi = ops.mask.query_hi(j1);
    for (int i0 = ilo; i0 <= ihi; i0 += kBlockM) {
      const Block blk{i0, std::min(kBlockM, ihi - i0 + 1), j0, n};
      compute_ds(p, d, g, hd, ops, blk, int64_t{b} * p.num_heads + h, w);
      gemm(n, d.Dp, blk.rows, w.s(), 1, kBlockN, MatB::row_major(hd.dout + int64_t{i0} * d.Dp, d.Dp),
           w.acc_b(), d.Dp, true);
      gemm(n, d.Dp, blk.rows, w.dp(), 1, kBlockN, MatB::row_major(hd.q + int64_t{i0} * d.Dp, d.Dp), w.acc_a(),
           d.Dp, true);
      if (with_dq) {
        gemm(blk.rows, d.Dp, n, w.dp(), kBlockN, 1, MatB::panels(g.k, d.skp, 0).from_row(j0),
             hd.dq + int64_t{i0} * d.Dp, d.Dp, true);
      }
    }
  }
  store_rows(p, d, w.acc_a(), j1 - j0 + 1, p.softmax_scale, p.dk, p.dk_strides, b, s.k0, j0, hk);
  store_rows(p, d, w.acc_b(), j1 - j0 + 1, 1.f, p.dv, p.dv_strides, b, s.k0, j0, hk);
}

// Pass B of the split schedule: dQ of query rows [i0, i0 + kBlockM) of (b, h).
void dq_block(const BackwardParams& p, const Dims& d, int b, int h, int i0, float* slot, Work& w) {
  const Seq s = seq_of(p, b);
  const int rows = std::min(kBlockM, s.sq - i0);
  const GroupData g(slot, d);
  const HeadData hd(slot, d, h % d.group);
  const ScoreOps ops = score_ops(p, s, b, h);
  float* dq = hd.dq + int64_t{i0} * d.Dp;
  const int lo = ops.mask.key_lo(i0), hi = ops.mask.key_hi(i0 + rows - 1);
  // Same kBlockN-aligned key blocks as pass A (for identical sums), cut short after the last
  // visible key: the keys left out would only add exact zeros.
  for (int j0 = lo / kBlockN * kBlockN; j0 <= hi; j0 += kBlockN) {
    const Block blk{i0, rows, j0, std::min(kBlockN, round_up(hi + 1, kLanes) - j0)};
    compute_ds(p, d, g, hd, ops, blk, int64_t{b} * p.num_heads + h, w);
    gemm(rows, d.Dp, blk.n, w.dp(), kBlockN, 1, MatB::panels(g.k, d.skp, 0).from_row(j0), dq, d.Dp, true);
  }
  store_rows(p, d, dq, rows, p.softmax_scale, p.dq, p.dq_strides, b, s.q0, i0, h);
}

// Staging task t of a group: t < kv_tasks stages keys, the others stage query rows of one head.
struct StagePlan {
  int kv_tasks, q_tasks;
  explicit StagePlan(const Dims& d)
      : kv_tasks((d.skp + kStageRows - 1) / kStageRows), q_tasks((d.sq + kStageRows - 1) / kStageRows) {}
  int tasks(const Dims& d) const { return kv_tasks + d.group * q_tasks; }
};

void stage_task(const BackwardParams& p, const Dims& d, const StagePlan& plan, int g, int t, float* slot) {
  const int b = g / p.num_heads_k, hk = g % p.num_heads_k;
  if (t < plan.kv_tasks) {
    stage_kv(p, d, b, hk, t * kStageRows, GroupData(slot, d));
    return;
  }
  const int hg = (t - plan.kv_tasks) / plan.q_tasks, i0 = (t - plan.kv_tasks) % plan.q_tasks * kStageRows;
  stage_head(p, d, b, hk * d.group + hg, i0, HeadData(slot, d, hg));
}

// Fused schedule: stages group g (= b * Hk + hk) and computes all of it in one task.
void group_fused(const BackwardParams& p, const Dims& d, int g, float* slot, Work& w) {
  const StagePlan plan(d);
  for (int t = 0; t < plan.tasks(d); ++t) stage_task(p, d, plan, g, t, slot);
  const int b = g / p.num_heads_k, hk = g % p.num_heads_k;
  const Seq s = seq_of(p, b);
  for (int j0 = 0; j0 < s.sk; j0 += kBlockN) dkdv_block(p, d, b, hk, j0, slot, w, true);
  for (int hg = 0; hg < d.group; ++hg) {
    const HeadData hd(slot, d, hg);
    store_rows(p, d, hd.dq, s.sq, p.softmax_scale, p.dq, p.dq_strides, b, s.q0, 0, hk * d.group + hg);
  }
}

}  // namespace

Status backward(const BackwardParams& p) {
  const Dims d = dims_of(p);
  const int groups = p.batch * p.num_heads_k;
  StagingBuffer staging(d.slot_floats(), groups);
  FA_RETURN_IF_ERROR(staging.status());
  const int chunk = staging.chunk();
  [[maybe_unused]] const int threads = resolve_threads(p);
  const StagePlan plan(d);
  for (int g0 = 0; g0 < groups; g0 += chunk) {
    const int ng = std::min(chunk, groups - g0);
    const bool fused = ng >= kFusedGroupsPerThread * threads;
    auto slot_of = [&](int g) { return staging.slot(g); };
#pragma omp parallel num_threads(threads)
    {
      Work w(d.Dp);
      if (fused) {
#pragma omp for schedule(dynamic) nowait
        for (int g = 0; g < ng; ++g) group_fused(p, d, g0 + g, slot_of(g), w);
      } else {
#pragma omp for schedule(dynamic)
        for (int64_t it = 0; it < int64_t{ng} * plan.tasks(d); ++it) {
          const int g = static_cast<int>(it / plan.tasks(d));
          stage_task(p, d, plan, g0 + g, static_cast<int>(it % plan.tasks(d)), slot_of(g));
        }
        // Passes A and B only read the staging and write disjoint outputs: no barrier between them.
#pragma omp for schedule(dynamic) nowait
        for (int64_t it = 0; it < int64_t{ng} * d.nkb; ++it) {
          const int g = static_cast<int>(it / d.nkb);
          dkdv_block(p, d, (g0 + g) / p.num_heads_k, (g0 + g) % p.num_heads_k, (it % d.nkb) * kBlockN,
                     slot_of(g), w, false);
        }
#pragma omp for schedule(dynamic) nowait
        for (int64_t it = 0; it < int64_t{ng} * d.group * d.nqb; ++it) {
          const int qb = static_cast<int>(it % d.nqb);
          const int64_t rest = it / d.nqb;
          const int g = static_cast<int>(rest / d.group), b = (g0 + g) / p.num_heads_k;
          const int h = ((g0 + g) % p.num_heads_k) * d.group + static_cast<int>(rest % d.group);
          if (qb * kBlockM < seq_of(p, b).sq) dq_block(p, d, b, h, qb * kBlockM, slot_of(g), w);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace flash_attention::cpu
