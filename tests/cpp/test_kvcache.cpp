// KV-cache path (kvcache.h) on the CPU: append + rotary + attention against an independent double-precision
// reference that reconstructs each sequence's cache; paged and contiguous layouts; index and shape errors;
// flash_attention::combine.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "flash_attention/kvcache.h"

namespace fa = flash_attention;

namespace {

// A host tensor of fp32 or fp16 values that the tests read and write as float.
struct Buf {
  fa::DType dtype = fa::DType::kFloat32;
  std::vector<float> f32;
  std::vector<_Float16> f16;

  Buf(fa::DType t, std::size_t n) : dtype(t) {
    if (t == fa::DType::kFloat32) f32.assign(n, 0.f); else f16.assign(n, _Float16(0.f));
  }
  static float round(fa::DType t, float x) { return t == fa::DType::kFloat32 ? x : float(_Float16(x)); }
  float get(std::size_t i) const { return dtype == fa::DType::kFloat32 ? f32[i] : float(f16[i]); }
  void set(std::size_t i, float v) {
    if (dtype == fa::DType::kFloat32) f32[i] = v; else f16[i] = _Float16(v);
  }
  void* data() { return dtype == fa::DType::kFloat32 ? static_cast<void*>(f32.data()) : f16.data(); }
  std::size_t size() const { return dtype == fa::DType::kFloat32 ? f32.size() : f16.size(); }
};

struct Spec {
  fa::DType dtype = fa::DType::kFloat32;
  int B = 2, Sq = 1, H = 4, Hk = 2, D = 32;
  int capacity = 64;
  int page = 0;  // 0: contiguous cache
  int new_len = 0;
  int rotary_dim = 0;
  bool interleaved = true;
  bool leftpad = false, batch_idx = false, varlen = false, alibi = false, no_seqlens = false;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0.f;
  int num_splits = 0;
};

// One problem: logical per-sequence caches (B, capacity, Hk, D) placed into the physical layout.
struct Problem {
  Spec s;
  std::mt19937 rng{1234};
  Buf q, knew, vnew, cos, sin, kc, vc, out;
  std::vector<float> logical_k, logical_v, lse, alibi;
  std::vector<int32_t> seqlens, leftpad, batch_idx, block_table, cu_q;
  int total_q = 0, cache_batch = 0, blocks_per_seq = 0;

  explicit Problem(const Spec& spec)
      : s(spec), q(spec.dtype, 0), knew(spec.dtype, 0), vnew(spec.dtype, 0), cos(spec.dtype, 0),
        sin(spec.dtype, 0), kc(spec.dtype, 0), vc(spec.dtype, 0), out(spec.dtype, 0) {
    make_lengths();
    total_q = s.varlen ? cu_q.back() : s.B * s.Sq;
    q = random(std::size_t(total_q) * s.H * s.D);
    knew = random(std::size_t(s.B) * s.new_len * s.Hk * s.D);
    vnew = random(knew.size());
    cos = random(std::size_t(s.capacity) * std::max(s.rotary_dim / 2, 1));
    sin = random(cos.size());
    out = Buf(s.dtype, std::size_t(total_q) * s.H * s.D);
    for (std::size_t i = 0; i < out.size(); ++i) out.set(i, NAN);  // poison
    lse.assign(std::size_t(total_q) * s.H, NAN);
    std::uniform_real_distribution<float> slope(0.05f, 0.5f);
    for (int i = 0; i < s.B * s.H; ++i) alibi.push_back(slope(rng));
    make_cache();
  }

  Buf random(std::size_t n) {
    std::normal_distribution<float> nd(0.f, 1.f);
    Buf b(s.dtype, n);
    for (std::size_t i = 0; i < n; ++i) b.set(i, nd(rng));
    return b;
  }

  void make_lengths() {
    std::uniform_int_distribution<int> len(0, s.capacity - s.new_len);
    for (int b = 0; b < s.B; ++b) seqlens.push_back(len(rng));
    if (s.B > 1 && !s.no_seqlens) seqlens[0] = 0;  // one empty cache
    for (int b = 0; b < s.B; ++b) {
      leftpad.push_back(s.leftpad ? std::uniform_int_distribution<int>(0, seqlens[b])(rng) : 0);
    }
    cu_q.push_back(0);
    for (int b = 0; b < s.B; ++b) cu_q.push_back(cu_q.back() + (s.varlen ? (b * 3 + 1) % (s.Sq + 1) : s.Sq));
  }

  int64_t sk_cache(int b) const { return s.no_seqlens ? s.capacity : seqlens[b]; }

  std::size_t logical_at(int b, int64_t pos, int h) const {
    return ((std::size_t(b) * s.capacity + pos) * s.Hk + h) * s.D;
  }
  std::size_t physical_at(int b, int64_t pos, int h) const {
    if (s.page == 0) {
      const int row = s.batch_idx ? batch_idx[b] : b;
      return ((std::size_t(row) * s.capacity + pos) * s.Hk + h) * s.D;
    }
    const int page = block_table[b * blocks_per_seq + pos / s.page];
    return ((std::size_t(page) * s.page + pos % s.page) * s.Hk + h) * s.D;
  }

  void make_cache() {
    std::normal_distribution<float> nd(0.f, 1.f);
    logical_k.resize(std::size_t(s.B) * s.capacity * s.Hk * s.D);
    logical_v.resize(logical_k.size());
    for (auto& x : logical_k) x = Buf::round(s.dtype, nd(rng));
    for (auto& x : logical_v) x = Buf::round(s.dtype, nd(rng));
    if (s.page == 0) {
      cache_batch = s.batch_idx ? s.B + 2 : s.B;
      std::vector<int32_t> rows(cache_batch);
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), rng);
      batch_idx.assign(rows.begin(), rows.begin() + s.B);
      kc = random(std::size_t(cache_batch) * s.capacity * s.Hk * s.D);
    } else {
      blocks_per_seq = s.capacity / s.page;
      cache_batch = s.B * blocks_per_seq + 3;
      std::vector<int32_t> pages(cache_batch);
      std::iota(pages.begin(), pages.end(), 0);
      std::shuffle(pages.begin(), pages.end(), rng);
      block_table.assign(pages.begin(), pages.begin() + s.B * blocks_per_seq);
      kc = random(std::size_t(cache_batch) * s.page * s.Hk * s.D);
    }
    vc = random(kc.size());
    for (int b = 0; b < s.B; ++b) {
      for (int64_t pos = 0; pos < s.capacity; ++pos) {
        for (int h = 0; h < s.Hk; ++h) {
          for (int d = 0; d < s.D; ++d) {
            kc.set(physical_at(b, pos, h) + d, logical_k[logical_at(b, pos, h) + d]);
            vc.set(physical_at(b, pos, h) + d, logical_v[logical_at(b, pos, h) + d]);
          }
        }
      }
      // Pages past the sequence's end are never read: mark them invalid.
      const int64_t end = sk_cache(b) + s.new_len;
      for (int blk = 0; s.page && blk < blocks_per_seq; ++blk) {
        if (int64_t(blk) * s.page >= end) block_table[b * blocks_per_seq + blk] = -1;
      }
    }
  }

  fa::KVCacheParams params() {
    fa::KVCacheParams p;
    p.dtype = s.dtype;
    p.batch = s.B;
    p.seqlen_q = s.Sq;
    p.num_heads = s.H;
    p.num_heads_k = s.Hk;
    p.head_dim = s.D;
    p.q = q.data();
    p.out = out.data();
    p.softmax_lse = lse.data();
    const int64_t qrow = int64_t(s.H) * s.D;
    p.q_strides = p.out_strides = {s.Sq * qrow, qrow, s.D};
    if (s.varlen) {
      p.cu_seqlens_q = cu_q.data();
      p.total_q = total_q;
    }
    p.k_cache = kc.data();
    p.v_cache = vc.data();
    const int rows = s.page ? s.page : s.capacity;
    p.k_cache_strides = p.v_cache_strides = {int64_t(rows) * s.Hk * s.D, int64_t(s.Hk) * s.D, s.D};
    p.cache_batch = cache_batch;
    p.cache_seqlen = rows;
    if (s.page) {
      p.block_table = block_table.data();
      p.block_table_stride = p.max_blocks_per_seq = blocks_per_seq;
    }
    if (s.batch_idx) p.cache_batch_idx = batch_idx.data();
    if (!s.no_seqlens) p.cache_seqlens = seqlens.data();
    if (s.leftpad) p.cache_leftpad = leftpad.data();
    if (s.new_len) {
      p.k_new = knew.data();
      p.v_new = vnew.data();
      p.seqlen_new = s.new_len;
      p.k_new_strides = p.v_new_strides = {int64_t(s.new_len) * s.Hk * s.D, int64_t(s.Hk) * s.D, s.D};
    }
    if (s.rotary_dim) {
      p.rotary_cos = cos.data();
      p.rotary_sin = sin.data();
      p.rotary_cos_stride = p.rotary_sin_stride = s.rotary_dim / 2;
      p.seqlen_rotary = s.capacity;
      p.rotary_dim = s.rotary_dim;
      p.rotary_interleaved = s.interleaved;
    }
    p.softmax_scale = 1.f / std::sqrt(float(s.D));
    p.causal = s.causal;
    p.window_left = s.wl;
    p.window_right = s.wr;
    p.softcap = s.softcap;
    if (s.alibi) {
      p.alibi_slopes = alibi.data();
      p.alibi_batch_stride = s.H;
    }
    p.num_splits = s.num_splits;
    return p;
  }

  // Rotates the first rotary_dim dims of x (D values) at position pos, in double, rounded to the dtype.
  void rotate(std::vector<double>& x, int64_t pos) const {
    const int half = s.rotary_dim / 2;
    for (int t = 0; t < half; ++t) {
      const int i0 = s.interleaved ? 2 * t : t, i1 = s.interleaved ? 2 * t + 1 : t + half;
      const double c = cos.get(pos * half + t), sn = sin.get(pos * half + t);
      const double x0 = x[i0], x1 = x[i1];
      x[i0] = Buf::round(s.dtype, float(x0 * c - x1 * sn));
      x[i1] = Buf::round(s.dtype, float(x0 * sn + x1 * c));
    }
  }

  // Logical caches after the append.
  void reference_append(std::vector<double>& k, std::vector<double>& v) const {
    k.assign(logical_k.begin(), logical_k.end());
    v.assign(logical_v.begin(), logical_v.end());
    for (int b = 0; b < s.B; ++b) {
      for (int t = 0; t < s.new_len; ++t) {
        const int64_t pos = sk_cache(b) + t;
        for (int h = 0; h < s.Hk; ++h) {
          std::vector<double> x(s.D);
          for (int d = 0; d < s.D; ++d) x[d] = knew.get(((std::size_t(b) * s.new_len + t) * s.Hk + h) * s.D + d);
          rotate(x, pos);
          for (int d = 0; d < s.D; ++d) {
            k[logical_at(b, pos, h) + d] = x[d];
            v[logical_at(b, pos, h) + d] = vnew.get(((std::size_t(b) * s.new_len + t) * s.Hk + h) * s.D + d);
          }
        }
      }
    }
  }

  // Reference out / lse of query row i (of sq) of sequence b, head h.
  void reference_row(const std::vector<double>& k, const std::vector<double>& v, int b, int i, int sq, int h,
                     std::vector<double>& o, double& lse_out) const {
    const int64_t lp = leftpad[b], sk = sk_cache(b) + s.new_len - lp;
    const int64_t qrow = s.varlen ? cu_q[b] + i : int64_t(b) * s.Sq + i;
    std::vector<double> x(s.D);
    for (int d = 0; d < s.D; ++d) x[d] = q.get((qrow * s.H + h) * s.D + d);
    const int wl = s.wl >= s.capacity ? -1 : s.wl, wr = s.causal ? 0 : s.wr;
    const bool per_row = wl >= 0 || (wr >= 0 && wr < s.capacity);
    rotate(x, sk_cache(b) + (per_row ? i : 0));
    const int hk = h / (s.H / s.Hk);
    const double scale = 1.0 / std::sqrt(double(s.D)), inf = std::numeric_limits<double>::infinity();
    std::vector<double> score(sk, -inf);
    double mx = -inf;
    for (int64_t j = 0; j < sk; ++j) {
      const int64_t diag = i + sk - sq;
      if ((wr >= 0 && j > diag + wr) || (wl >= 0 && j < diag - wl)) continue;
      double acc = 0;
      for (int d = 0; d < s.D; ++d) acc += x[d] * k[logical_at(b, lp + j, hk) + d];
      acc *= scale;
      if (s.softcap > 0) acc = s.softcap * std::tanh(acc / s.softcap);
      if (s.alibi) acc -= alibi[b * s.H + h] * std::abs(double(diag - j));
      score[j] = acc;
      mx = std::max(mx, acc);
    }
    o.assign(s.D, 0.0);
    if (mx == -inf) {
      lse_out = inf;
      return;
    }
    double sum = 0;
    for (int64_t j = 0; j < sk; ++j) {
      if (score[j] == -inf) continue;
      const double w = std::exp(score[j] - mx);
      sum += w;
      for (int d = 0; d < s.D; ++d) o[d] += w * v[logical_at(b, lp + j, hk) + d];
    }
    for (auto& x2 : o) x2 /= sum;
    lse_out = mx + std::log(sum);
  }

  // Runs the call and compares out, lse and the cache contents with the reference.
  void run_and_check(double tol) {
    const fa::Status st = fa::kvcache_forward(params());
    ASSERT_TRUE(st.ok()) << st.message();
    std::vector<double> k, v;
    reference_append(k, v);
    check_cache(k, v);
    for (int b = 0; b < s.B; ++b) {
      const int sq = cu_q[b + 1] - cu_q[b];
      for (int i = 0; i < sq; ++i) {
        for (int h = 0; h < s.H; ++h) {
          std::vector<double> o;
          double ref_lse;
          reference_row(k, v, b, i, sq, h, o, ref_lse);
          const int64_t qrow = s.varlen ? cu_q[b] + i : int64_t(b) * s.Sq + i;
          for (int d = 0; d < s.D; ++d) {
            ASSERT_NEAR(out.get((qrow * s.H + h) * s.D + d), o[d], tol) << "b=" << b << " i=" << i << " h=" << h;
          }
          const float got = s.varlen ? lse[h * total_q + qrow] : lse[(b * s.H + h) * s.Sq + i];
          if (std::isinf(ref_lse)) {
            EXPECT_TRUE(std::isinf(got) && got > 0) << got;
          } else {
            EXPECT_NEAR(got, ref_lse, tol * 10) << "b=" << b << " i=" << i << " h=" << h;
          }
        }
      }
    }
  }

  void check_cache(const std::vector<double>& k, const std::vector<double>& v) const {
    for (int b = 0; b < s.B; ++b) {
      for (int64_t pos = 0; pos < sk_cache(b) + s.new_len; ++pos) {
        for (int h = 0; h < s.Hk; ++h) {
          for (int d = 0; d < s.D; ++d) {
            ASSERT_NEAR(kc.get(physical_at(b, pos, h) + d), k[logical_at(b, pos, h) + d], 1e-6 + 1e-3 * (s.dtype != fa::DType::kFloat32))
                << "k_cache b=" << b << " pos=" << pos;
            ASSERT_EQ(vc.get(physical_at(b, pos, h) + d), float(v[logical_at(b, pos, h) + d])) << "v_cache b=" << b;
          }
        }
      }
    }
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Correctness sweeps
// ------------------------------------------------------------------------------------------------------

TEST(KVCache, DecodeContiguousGQA) {
  Spec s;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, AppendRotaryLayouts) {
  for (int page : {0, 16, 32}) {
    for (int rotary : {0, 16, 32}) {
      for (bool interleaved : {true, false}) {
        Spec s;
        s.page = page;
        s.rotary_dim = rotary;
        s.interleaved = interleaved;
        s.new_len = 3;
        s.Sq = 3;
        s.causal = true;
        SCOPED_TRACE("page=" + std::to_string(page) + " rotary=" + std::to_string(rotary));
        Problem(s).run_and_check(1e-4);
      }
    }
  }
}

TEST(KVCache, NonCausalRotaryRotatesEveryQueryRowAtOnePosition) {
  Spec s;
  s.Sq = 4;
  s.new_len = 2;
  s.rotary_dim = 32;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, LeftpadAndBatchIdx) {
  Spec s;
  s.B = 4;
  s.leftpad = true;
  s.batch_idx = true;
  s.new_len = 2;
  s.Sq = 2;
  s.causal = true;
  s.rotary_dim = 16;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, PagedLeftpadWindowSoftcapAlibi) {
  Spec s;
  s.B = 3;
  s.page = 16;
  s.capacity = 96;
  s.leftpad = true;
  s.Sq = 5;
  s.new_len = 5;
  s.wl = 7;
  s.wr = 2;
  s.softcap = 5.f;
  s.alibi = true;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, PageSize48AndMQA) {
  Spec s;
  s.page = 48;
  s.capacity = 144;
  s.H = 6;
  s.Hk = 1;
  s.new_len = 1;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, VarlenQueriesOverPagedCache) {
  Spec s;
  s.B = 4;
  s.Sq = 6;
  s.varlen = true;
  s.page = 16;
  s.causal = true;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, FullCacheWithoutSeqlens) {
  Spec s;
  s.no_seqlens = true;
  s.Sq = 2;
  s.causal = true;
  Problem(s).run_and_check(1e-4);
}

TEST(KVCache, Float16) {
  Spec s;
  s.dtype = fa::DType::kFloat16;
  s.page = 16;
  s.new_len = 2;
  s.Sq = 2;
  s.rotary_dim = 32;
  s.interleaved = false;
  s.causal = true;
  Problem(s).run_and_check(1e-2);
}

TEST(KVCache, EveryCacheEmpty) {
  Spec s;
  s.B = 1;
  Problem pr(s);
  pr.seqlens[0] = 0;
  pr.run_and_check(1e-4);
  EXPECT_TRUE(std::isinf(pr.lse[0]) && pr.lse[0] > 0);
}

// ------------------------------------------------------------------------------------------------------
// Bad input: every message names the argument
// ------------------------------------------------------------------------------------------------------

void expect_invalid(const fa::KVCacheParams& p, const std::string& name) {
  const fa::Status st = fa::kvcache_forward(p);
  EXPECT_EQ(st.code(), fa::StatusCode::kInvalidArgument) << name;
  EXPECT_NE(st.message().find(name), std::string::npos) << st.message();
}

TEST(KVCacheErrors, IndexRanges) {
  Spec s;
  s.page = 16;
  s.new_len = 1;
  s.leftpad = true;
  s.rotary_dim = 16;
  Problem pr(s);
  fa::KVCacheParams p = pr.params();
  pr.seqlens[1] = s.capacity;  // no room for the new row
  expect_invalid(p, "cache_seqlens[1]");
  pr.seqlens[1] = -1;
  expect_invalid(p, "cache_seqlens[1]");
  pr.seqlens[1] = 20;
  pr.leftpad[1] = 21;
  expect_invalid(p, "cache_leftpad[1]");
  pr.leftpad[1] = 0;
  pr.block_table[pr.blocks_per_seq + 1] = pr.cache_batch;  // a page this call reads
  expect_invalid(p, "block_table[1, 1]");
  pr.block_table[pr.blocks_per_seq + 1] = -1;
  expect_invalid(p, "block_table[1, 1]");
  pr.block_table[pr.blocks_per_seq + 1] = 0;
  p.seqlen_rotary = 10;
  expect_invalid(p, "rotary_cos");
}

TEST(KVCacheErrors, VarlenAndBatchIdx) {
  Spec s;
  s.batch_idx = true;
  s.varlen = true;
  s.Sq = 4;
  Problem pr(s);
  fa::KVCacheParams p = pr.params();
  pr.batch_idx[0] = pr.cache_batch;
  expect_invalid(p, "cache_batch_idx[0]");
  pr.batch_idx[0] = 0;
  pr.cu_q[1] = 9;
  expect_invalid(p, "cu_seqlens_q");
}

TEST(KVCacheErrors, Shapes) {
  Spec s;
  s.page = 16;
  s.new_len = 1;
  s.rotary_dim = 16;
  Problem pr(s);
  auto bad = [&](auto edit, const std::string& name) {
    fa::KVCacheParams p = pr.params();
    edit(p);
    expect_invalid(p, name);
  };
  bad([](fa::KVCacheParams& p) { p.cache_seqlen = 24; }, "page_size");
  bad([&](fa::KVCacheParams& p) { p.cache_batch_idx = pr.seqlens.data(); }, "cache_batch_idx");
  bad([](fa::KVCacheParams& p) { p.cache_seqlens = nullptr; }, "cache_seqlens");
  bad([](fa::KVCacheParams& p) { p.v_new = nullptr; }, "k_new / v_new");
  bad([](fa::KVCacheParams& p) { p.rotary_sin = nullptr; }, "rotary_cos / rotary_sin");
  bad([](fa::KVCacheParams& p) { p.rotary_dim = 40; }, "rotary_dim");
  bad([](fa::KVCacheParams& p) { p.head_dim = 12; }, "head_dim");
  bad([](fa::KVCacheParams& p) { p.num_heads = 3; }, "num_heads");
  bad([](fa::KVCacheParams& p) { p.k_cache = nullptr; }, "k_cache");
  bad([](fa::KVCacheParams& p) { p.softmax_lse = nullptr; }, "softmax_lse");
  bad([](fa::KVCacheParams& p) { p.softmax_scale = 0.f; }, "softmax_scale");
  bad([](fa::KVCacheParams& p) { p.num_splits = -1; }, "num_splits");
  bad([](fa::KVCacheParams& p) { p.seqlen_new = 1000; }, "seqlen_new");
  bad([](fa::KVCacheParams& p) { p.block_table_stride = 1; }, "block_table_stride");
  Spec c;
  c.B = 3;
  Problem contiguous(c);
  fa::KVCacheParams p = contiguous.params();
  p.cache_batch = 2;
  expect_invalid(p, "k_cache");
}

// ------------------------------------------------------------------------------------------------------
// combine
// ------------------------------------------------------------------------------------------------------

TEST(Combine, MatchesAttentionOverAllKeys) {
  // Two halves of one contiguous cache attended separately, then combined, equal attention over all keys.
  Spec s;
  s.B = 1;
  s.capacity = 64;
  s.no_seqlens = true;
  s.H = 2;
  s.Hk = 2;
  Problem full(s);
  ASSERT_TRUE(fa::kvcache_forward(full.params()).ok());

  const int n = 2, D = s.D, H = s.H;
  std::vector<float> out_partial(n * H * D), lse_partial(n * H);
  for (int part = 0; part < n; ++part) {
    fa::KVCacheParams p = full.params();
    std::vector<float> o(H * D), l(H);
    p.k_cache = full.kc.f32.data() + part * 32 * s.Hk * D;
    p.v_cache = full.vc.f32.data() + part * 32 * s.Hk * D;
    p.cache_seqlen = 32;
    p.out = o.data();
    p.softmax_lse = l.data();
    ASSERT_TRUE(fa::kvcache_forward(p).ok());
    std::copy(o.begin(), o.end(), out_partial.begin() + part * H * D);
    for (int h = 0; h < H; ++h) lse_partial[part * H + h] = l[h];  // (split, b, s, h) with B = S = 1
  }
  std::vector<float> out(H * D, NAN), lse(H, NAN);
  fa::CombineParams c;
  c.num_splits = n;
  c.batch = 1;
  c.seqlen = 1;
  c.num_heads = H;
  c.head_dim = D;
  c.out_partial = out_partial.data();
  c.out_partial_split_stride = H * D;
  c.out_partial_strides = {H * D, H * D, D};
  c.lse_partial = lse_partial.data();
  c.lse_split_stride = H;
  c.lse_batch_stride = H;
  c.lse_row_stride = H;
  c.lse_head_stride = 1;
  c.out = out.data();
  c.out_strides = {H * D, H * D, D};
  c.softmax_lse = lse.data();
  ASSERT_TRUE(fa::combine(c).ok());
  for (int i = 0; i < H * D; ++i) EXPECT_NEAR(out[i], full.out.f32[i], 1e-5);
  for (int h = 0; h < H; ++h) EXPECT_NEAR(lse[h], full.lse[h], 1e-5);
}

TEST(Combine, EmptyPartsAndErrors) {
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> out_partial = {1, 2, NAN, NAN, 5, 6, 7, 8};  // (split 2, b 1, s 1, h 2, d 2)
  std::vector<float> lse_partial = {0.5f, ninf, ninf, ninf};       // (split, h): head 1 is empty everywhere
  std::vector<float> out(4, NAN), lse(2, NAN);
  fa::CombineParams c;
  c.num_splits = 2;
  c.batch = c.seqlen = 1;
  c.num_heads = c.head_dim = 2;
  c.out_partial = out_partial.data();
  c.out_partial_split_stride = 4;
  c.out_partial_strides = {4, 4, 2};
  c.lse_partial = lse_partial.data();
  c.lse_split_stride = 2;
  c.lse_batch_stride = c.lse_row_stride = 2;
  c.lse_head_stride = 1;
  c.out = out.data();
  c.out_strides = {4, 4, 2};
  c.softmax_lse = lse.data();
  ASSERT_TRUE(fa::combine(c).ok());
  EXPECT_FLOAT_EQ(out[0], 1.f);
  EXPECT_FLOAT_EQ(out[1], 2.f);
  EXPECT_EQ(out[2], 0.f);
  EXPECT_EQ(out[3], 0.f);
  EXPECT_FLOAT_EQ(lse[0], 0.5f);
  EXPECT_TRUE(std::isinf(lse[1]) && lse[1] > 0);

  c.num_splits = 0;
  fa::Status st = fa::combine(c);
  EXPECT_NE(st.message().find("num_splits"), std::string::npos);
  c.num_splits = 2;
  c.lse_partial = nullptr;
  st = fa::combine(c);
  EXPECT_NE(st.message().find("lse_partial"), std::string::npos);
}
