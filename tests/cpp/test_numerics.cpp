// Forward and backward of the CPU implementation against the double-precision reference, for
// every option, size class, dtype and layout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "testing.h"

namespace fa_test {
namespace {

using flash_attention::DType;

double tolerance(DType dtype, bool grad) {
  switch (dtype) {
    case DType::kFloat32:
      return grad ? 1e-4 : 2e-5;
    case DType::kFloat16:
      return 2e-3;
    case DType::kBFloat16:
      return 1e-2;
  }
  return 0;
}

// Max |ours - ref| relative to max(1, max |ref|) over one tensor; also fails on NaN.
struct Compare {
  double max_err = 0, max_ref = 0;
  bool nan = false;
  void add(double ours, double ref) {
    if (std::isnan(ours)) nan = true;
    max_err = std::max(max_err, std::abs(ours - ref));
    max_ref = std::max(max_ref, std::abs(ref));
  }
  double rel() const { return max_err / std::max(1.0, max_ref); }
};

void expect_close(const Compare& c, double tol, const std::string& what) {
  EXPECT_FALSE(c.nan) << what << " has NaN";
  EXPECT_LE(c.rel(), tol) << what << ": max err " << c.max_err << ", max |ref| " << c.max_ref;
}

void check_forward(Problem& pr, const RefResult& ref) {
  const Case& c = pr.c;
  Compare out, lse;
  for (int b = 0; b < pr.batch; ++b) {
    for (int i = 0; i < pr.len_q(b); ++i) {
      for (int h = 0; h < c.heads; ++h) {
        for (int d = 0; d < c.dim; ++d)
          out.add(pr.out.get(pr.tb(b), pr.row_q(b, i), h, d),
                  ref.out[b][(int64_t{i} * c.heads + h) * c.dim + d]);
        const double want = ref.lse[b][int64_t{h} * pr.len_q(b) + i];
        const double got = pr.lse[pr.lse_index(b, h, i)];
        if (std::isinf(want)) {
          EXPECT_TRUE(std::isinf(got) && got > 0) << "lse of a fully masked row must be +inf, got " << got;
        } else {
          lse.add(got, want);
        }
      }
    }
  }
  expect_close(out, tolerance(c.dtype, false), "out");
  expect_close(lse, 2e-5, "softmax_lse");
}

void check_backward(Problem& pr, const RefResult& ref) {
  const Case& c = pr.c;
  Compare dq, dk, dv;
  for (int b = 0; b < pr.batch; ++b) {
    for (int i = 0; i < pr.len_q(b); ++i)
      for (int h = 0; h < c.heads; ++h)
        for (int d = 0; d < c.dim; ++d)
          dq.add(pr.dq.get(pr.tb(b), pr.row_q(b, i), h, d),
                 ref.dq[b][(int64_t{i} * c.heads + h) * c.dim + d]);
    for (int j = 0; j < pr.len_k(b); ++j)
      for (int h = 0; h < c.heads_k; ++h)
        for (int d = 0; d < c.dim; ++d) {
          const int64_t idx = (int64_t{j} * c.heads_k + h) * c.dim + d;
          dk.add(pr.dk.get(pr.tb(b), pr.row_k(b, j), h, d), ref.dk[b][idx]);
          dv.add(pr.dv.get(pr.tb(b), pr.row_k(b, j), h, d), ref.dv[b][idx]);
        }
  }
  const double tol = tolerance(c.dtype, true);
  expect_close(dq, tol, "dq");
  expect_close(dk, tol, "dk");
  expect_close(dv, tol, "dv");
}

class Numerics : public ::testing::TestWithParam<Case> {};

TEST_P(Numerics, ForwardBackwardMatchReference) {
  Problem pr(GetParam());
  const RefResult ref = reference(pr, pr.c.backward);
  const flash_attention::Status fwd = flash_attention::forward(pr.forward_params());
  ASSERT_TRUE(fwd.ok()) << fwd.message();
  check_forward(pr, ref);
  EXPECT_TRUE(pr.out.gaps_untouched()) << "forward wrote outside out's elements";
  if (!pr.c.backward) return;
  const flash_attention::Status bwd = flash_attention::backward(pr.backward_params());
  ASSERT_TRUE(bwd.ok()) << bwd.message();
  check_backward(pr, ref);
  EXPECT_TRUE(pr.dq.gaps_untouched() && pr.dk.gaps_untouched() && pr.dv.gaps_untouched())
      << "backward wrote outside dq/dk/dv's elements";
}

Case make(std::string name, int b, int sq, int sk, int h, int hk, int d, DType dt = DType::kFloat32) {
  Case c;
  c.name = std::move(name);
  c.batch = b;
  c.seqlen_q = sq;
  c.seqlen_k = sk;
  c.heads = h;
  c.heads_k = hk;
  c.dim = d;
  c.dtype = dt;
  return c;
}

template <typename F>
Case with(Case c, F f) {
  f(c);
  return c;
}

std::vector<Case> cases() {
  const DType f16 = DType::kFloat16, b16 = DType::kBFloat16;
  std::vector<Case> v = {
      make("basic_fp32", 2, 113, 113, 2, 2, 64),
      make("basic_fp16", 2, 113, 113, 2, 2, 64, f16),
      make("basic_bf16", 2, 113, 113, 2, 2, 64, b16),
      make("size1", 1, 1, 1, 1, 1, 16),
      make("size7", 2, 7, 7, 3, 1, 8),
      make("sq1_sk1023", 1, 1, 1023, 2, 1, 32),
      make("size1023", 1, 1023, 1023, 1, 1, 16),
      make("sq_lt_sk", 1, 40, 150, 2, 2, 32),
      make("sq_gt_sk", 1, 150, 40, 2, 2, 32),
      make("head_dim1", 1, 20, 30, 1, 1, 1),
      make("head_dim7", 1, 20, 30, 2, 1, 7, f16),
      make("head_dim33", 1, 70, 50, 2, 2, 33),
      make("head_dim80_bf16", 1, 70, 50, 2, 2, 80, b16),
      make("head_dim200", 1, 33, 65, 1, 1, 200),
      make("head_dim1024", 1, 5, 9, 2, 1, 1024),
      make("gqa", 2, 50, 70, 6, 2, 32),
      make("mqa_fp16", 1, 50, 70, 4, 1, 32, f16),
  };
  auto causal = [](Case& c) { c.causal = true; };
  v.push_back(with(make("causal", 2, 130, 130, 2, 1, 32), causal));
  v.push_back(with(make("causal_sq_lt_sk", 1, 37, 200, 2, 2, 32), causal));
  v.push_back(with(make("causal_sq_gt_sk", 1, 200, 37, 2, 2, 32), causal));  // top rows fully masked
  v.push_back(with(make("causal_bf16", 1, 300, 300, 2, 2, 64, b16), causal));
  v.push_back(with(make("window_both", 1, 150, 170, 2, 2, 32), [](Case& c) {
    c.window_left = 20;
    c.window_right = 5;
  }));
  v.push_back(with(make("window_left", 1, 150, 150, 2, 2, 32), [](Case& c) { c.window_left = 9; }));
  v.push_back(with(make("window_right", 1, 150, 120, 2, 2, 32), [](Case& c) { c.window_right = 3; }));
  v.push_back(with(make("window_causal_local", 2, 90, 90, 2, 1, 16), [](Case& c) {
    c.causal = true;
    c.window_left = 16;
  }));
  v.push_back(with(make("window_empty_rows", 1, 100, 20, 1, 1, 16), [](Case& c) {
    c.window_left = 0;
    c.window_right = 0;
  }));
  v.push_back(with(make("softcap", 2, 90, 100, 2, 2, 32), [](Case& c) { c.softcap = 1.5f; }));
  v.push_back(with(make("softcap_fp16_causal", 1, 90, 100, 2, 1, 64, f16), [](Case& c) {
    c.softcap = 5.f;
    c.causal = true;
  }));
  v.push_back(with(make("alibi_h", 2, 80, 100, 4, 2, 32), [](Case& c) { c.alibi = 1; }));
  v.push_back(with(make("alibi_bh_causal", 2, 100, 80, 2, 2, 32), [](Case& c) {
    c.alibi = 2;
    c.causal = true;
  }));
  v.push_back(with(make("dropout", 2, 70, 90, 2, 1, 32), [](Case& c) { c.dropout = 0.3f; }));
  v.push_back(with(make("dropout_causal_bf16", 1, 130, 130, 2, 2, 64, b16), [](Case& c) {
    c.dropout = 0.1f;
    c.causal = true;
  }));
  v.push_back(with(make("padded_strides", 2, 60, 75, 4, 2, 24), [](Case& c) { c.layout = Layout::kPadded; }));
  v.push_back(with(make("head_major_fp16", 2, 60, 75, 2, 2, 40, f16), [](Case& c) {
    c.layout = Layout::kHeadMajor;
    c.causal = true;
  }));
  v.push_back(with(make("varlen", 1, 0, 0, 2, 2, 32), [](Case& c) {
    c.lens_q = {5, 17, 67, 1};
    c.lens_k = {7, 17, 130, 200};
  }));
  v.push_back(with(make("varlen_empty_seqs", 1, 0, 0, 4, 2, 32), [](Case& c) {
    c.lens_q = {5, 0, 17, 70, 3};
    c.lens_k = {7, 3, 0, 66, 0};
    c.causal = true;
  }));
  v.push_back(with(make("varlen_everything_bf16", 1, 0, 0, 4, 2, 48, b16), [](Case& c) {
    c.lens_q = {30, 0, 129};
    c.lens_k = {65, 9, 100};
    c.window_left = 40;
    c.causal = true;
    c.softcap = 3.f;
    c.alibi = 2;
    c.dropout = 0.2f;
    c.layout = Layout::kPadded;
  }));
  v.push_back(with(make("everything_dense", 2, 77, 101, 6, 3, 20), [](Case& c) {
    c.window_left = 30;
    c.window_right = 10;
    c.softcap = 2.f;
    c.alibi = 1;
    c.dropout = 0.25f;
    c.layout = Layout::kHeadMajor;
  }));
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cpu, Numerics, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace fa_test
