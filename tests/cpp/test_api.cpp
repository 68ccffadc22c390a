// Validation (one test per error), normalisation, routing, KernelConfig, dtype helpers,
// dropout_mask, determinism and finite-difference gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>

#include "common/philox.h"
#include "cpu/common.h"
#include "testing.h"

namespace fa_test {
namespace {

namespace fa = flash_attention;
using fa::StatusCode;

Case small_case() {
  Case c;
  c.batch = 2;
  c.seqlen_q = 9;
  c.seqlen_k = 11;
  c.heads = 4;
  c.heads_k = 2;
  c.dim = 16;
  return c;
}

Case varlen_case() {
  Case c = small_case();
  c.lens_q = {3, 0, 6};
  c.lens_k = {4, 2, 5};
  return c;
}

struct Mutation {
  std::string field;  // the message must start with it
  std::function<void(fa::BackwardParams&)> apply;
  bool varlen = false;
  bool backward_only = false;
};

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

std::vector<Mutation> mutations() {
  using P = fa::BackwardParams;
  return {
      {"device", [](P& p) { p.device = static_cast<fa::Device>(7); }},
      {"dtype", [](P& p) { p.dtype = static_cast<fa::DType>(9); }},
      {"batch", [](P& p) { p.batch = 0; }},
      {"seqlen_q", [](P& p) { p.seqlen_q = 0; }},
      {"seqlen_k", [](P& p) { p.seqlen_k = -3; }},
      {"num_heads", [](P& p) { p.num_heads = 0; }},
      {"num_heads_k", [](P& p) { p.num_heads_k = 0; }},
      {"num_heads", [](P& p) { p.num_heads = 3; }},  // not a multiple of num_heads_k = 2
      {"head_dim", [](P& p) { p.head_dim = 0; }},
      {"head_dim", [](P& p) { p.head_dim = 1025; }},
      {"q", [](P& p) { p.q = nullptr; }},
      {"k", [](P& p) { p.k = nullptr; }},
      {"v", [](P& p) { p.v = nullptr; }},
      {"out", [](P& p) { p.out = nullptr; }},
      {"softmax_lse", [](P& p) { p.softmax_lse = nullptr; }},
      {"q_strides.row", [](P& p) { p.q_strides.row = -1; }},
      {"k_strides.head", [](P& p) { p.k_strides.head = -4; }},
      {"v_strides.batch", [](P& p) { p.v_strides.batch = -1; }},
      {"out_strides.row", [](P& p) { p.out_strides.row = -16; }},
      {"cu_seqlens_q/cu_seqlens_k", [](P& p) { p.cu_seqlens_k = nullptr; }, true},
      {"cu_seqlens_q/cu_seqlens_k", [](P& p) { p.cu_seqlens_q = nullptr; }, true},
      {"total_q", [](P& p) { p.total_q = -1; }, true},
      {"total_k", [](P& p) { p.total_k = -1; }, true},
      {"cu_seqlens_q", [](P& p) { const_cast<int32_t*>(p.cu_seqlens_q)[0] = 1; }, true},
      {"cu_seqlens_q", [](P& p) { const_cast<int32_t*>(p.cu_seqlens_q)[1] = 5; }, true},  // 5 > 3 = next
      {"cu_seqlens_k", [](P& p) { p.total_k += 1; }, true},                               // last != total
      {"cu_seqlens_k", [](P& p) { p.seqlen_k = 4; }, true},                               // a length > max
      {"softmax_scale", [](P& p) { p.softmax_scale = 0.f; }},
      {"softmax_scale", [](P& p) { p.softmax_scale = kNaN; }},
      {"softmax_scale", [](P& p) { p.softmax_scale = kInf; }},
      {"window_left", [](P& p) { p.window_left = -2; }},
      {"window_right", [](P& p) { p.window_right = -5; }},
      {"softcap", [](P& p) { p.softcap = -1.f; }},
      {"softcap", [](P& p) { p.softcap = kInf; }},
      {"dropout_p", [](P& p) { p.dropout_p = 1.f; }},
      {"dropout_p", [](P& p) { p.dropout_p = -0.1f; }},
      {"dropout_p", [](P& p) { p.dropout_p = kNaN; }},
      {"alibi_batch_stride", [](P& p) { p.alibi_batch_stride = 4; }},  // without slopes
      {"alibi_batch_stride",
       [](P& p) {
         static const float slopes[8] = {};
         p.alibi_slopes = slopes;
         p.alibi_batch_stride = 2;  // < num_heads
       }},
      {"alibi_batch_stride",
       [](P& p) {
         static const float slopes[8] = {};
         p.alibi_slopes = slopes;
         p.alibi_batch_stride = -1;
       }},
      {"num_threads", [](P& p) { p.num_threads = -1; }},
      {"config", [](P& p) { ASSERT_TRUE(fa::KernelConfig::parse("sm80:m128n64w4s2", &p.config).ok()); }},
      {"dout", [](P& p) { p.dout = nullptr; }, false, true},
      {"dq", [](P& p) { p.dq = nullptr; }, false, true},
      {"dk", [](P& p) { p.dk = nullptr; }, false, true},
      {"dv", [](P& p) { p.dv = nullptr; }, false, true},
      {"dout_strides.row", [](P& p) { p.dout_strides.row = -1; }, false, true},
      {"dq_strides.head", [](P& p) { p.dq_strides.head = -1; }, false, true},
      {"dk_strides.batch", [](P& p) { p.dk_strides.batch = -1; }, false, true},
      {"dv_strides.row", [](P& p) { p.dv_strides.row = -1; }, false, true},
  };
}

void PrintTo(const Mutation& m, std::ostream* os) { *os << m.field; }

class Validation : public ::testing::TestWithParam<Mutation> {};

void expect_invalid(const fa::Status& s, const std::string& field) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.message();
  EXPECT_EQ(s.message().rfind(field + " ", 0), 0u)
      << "message should start with '" << field << "': " << s.message();
}

TEST_P(Validation, RejectsWithFieldName) {
  const Mutation& m = GetParam();
  Problem pr(m.varlen ? varlen_case() : small_case());
  fa::BackwardParams p = pr.backward_params();
  ASSERT_TRUE(fa::validate(p).ok()) << fa::validate(p).message();
  m.apply(p);
  if (!m.backward_only) {
    expect_invalid(fa::forward(static_cast<fa::ForwardParams&>(p)), m.field);
  }
  expect_invalid(fa::backward(p), m.field);
}

INSTANTIATE_TEST_SUITE_P(Api, Validation, ::testing::ValuesIn(mutations()),
                         [](const ::testing::TestParamInfo<Mutation>& info) {
                           std::string name = info.param.field + "_" + std::to_string(info.index);
                           for (char& ch : name) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return name;
                         });

TEST(Validation, EmptyVarlenBatchIsValid) {
  Case c = small_case();
  c.lens_q = {0, 0};
  c.lens_k = {0, 3};
  Problem pr(c);
  fa::BackwardParams p = pr.backward_params();
  p.q = p.out = nullptr;
  p.softmax_lse = nullptr;
  p.dout = p.dq = nullptr;
  EXPECT_TRUE(fa::forward(p).ok());
  EXPECT_TRUE(fa::backward(p).ok());
}

TEST(Normalize, FoldsCausalAndCollapsesWideWindows) {
  fa::ForwardParams p;
  p.seqlen_q = 10;
  p.seqlen_k = 20;
  p.causal = true;
  fa::normalize(p);
  EXPECT_EQ(p.window_right, 0);
  EXPECT_EQ(p.window_left, -1);
  EXPECT_TRUE(p.causal);

  p = fa::ForwardParams();
  p.seqlen_q = 10;
  p.seqlen_k = 20;
  p.window_left = 19;  // >= Sk - 1: covers every key
  p.window_right = 9;  // >= Sq - 1
  fa::normalize(p);
  EXPECT_EQ(p.window_left, -1);
  EXPECT_EQ(p.window_right, -1);
  EXPECT_FALSE(p.causal);

  p = fa::ForwardParams();
  p.seqlen_q = 1;  // decode: causal masks nothing
  p.seqlen_k = 20;
  p.causal = true;
  fa::normalize(p);
  EXPECT_EQ(p.window_right, -1);
  EXPECT_FALSE(p.causal);

  p = fa::ForwardParams();
  p.seqlen_q = 10;
  p.seqlen_k = 10;
  p.causal = true;
  p.window_left = 3;  // local attention is not plain causal
  fa::normalize(p);
  EXPECT_EQ(p.window_left, 3);
  EXPECT_EQ(p.window_right, 0);
  EXPECT_FALSE(p.causal);
}

TEST(Routing, CudaWithoutCudaBuild) {
  if (fa::cuda_built()) GTEST_SKIP() << "built with CUDA";
  Problem pr(small_case());
  fa::BackwardParams p = pr.backward_params();
  p.device = fa::Device::kCUDA;
  EXPECT_EQ(fa::forward(p).code(), StatusCode::kNotSupported);
  EXPECT_EQ(fa::forward(p).message(), "built without CUDA");
  EXPECT_EQ(fa::backward(p).code(), StatusCode::kNotSupported);
  uint8_t mask[4];
  EXPECT_EQ(fa::dropout_mask(fa::Device::kCUDA, 1, 2, 0.5f, 1, 1, 2, 2, mask).code(),
            StatusCode::kNotSupported);
  EXPECT_TRUE(fa::cuda_archs_built().empty());
  EXPECT_TRUE(fa::cuda_configs(80, 64, fa::DType::kFloat16).empty());
  EXPECT_EQ(fa::cuda_unsupported_reason(p, 90), "built without CUDA");
}

TEST(KernelConfig, RoundTrip) {
  for (const std::string s : {"sm80:m128n64w4s2", "sm80:m64n32w4s1q", "sm90:m128n128w12s2"}) {
    fa::KernelConfig c;
    ASSERT_TRUE(fa::KernelConfig::parse(s, &c).ok()) << s;
    EXPECT_EQ(c.to_string(), s);
  }
  fa::KernelConfig c;
  ASSERT_TRUE(fa::KernelConfig::parse("sm80:m128n64w4s2q", &c).ok());
  EXPECT_EQ(c.path, fa::KernelPath::kSm80);
  EXPECT_EQ(c.block_m, 128);
  EXPECT_EQ(c.block_n, 64);
  EXPECT_EQ(c.num_warps, 4);
  EXPECT_EQ(c.stages, 2);
  EXPECT_TRUE(c.q_in_regs);
  for (const std::string s : {"", "auto"}) {
    ASSERT_TRUE(fa::KernelConfig::parse(s, &c).ok());
    EXPECT_TRUE(c.is_auto());
    EXPECT_EQ(c.to_string(), "auto");
  }
}

TEST(KernelConfig, RejectsMalformed) {
  for (const std::string s : {"sm70:m128n64w4s2", "sm80:m128", "sm80:m128n64w4s2x", "sm80:m0n64w4s2",
                              "sm80:n64m128w4s2", "fast", "sm80:m128n64w4s2qq", "sm90:m-1n64w4s2"}) {
    fa::KernelConfig c;
    const fa::Status st = fa::KernelConfig::parse(s, &c);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(st.message().rfind("config", 0), 0u) << st.message();
  }
  EXPECT_EQ(fa::KernelConfig::parse("auto", nullptr).code(), StatusCode::kInvalidArgument);
}

TEST(DType, NamesAndSizes) {
  EXPECT_STREQ(fa::dtype_name(fa::DType::kFloat16), "float16");
  EXPECT_STREQ(fa::dtype_name(fa::DType::kBFloat16), "bfloat16");
  EXPECT_STREQ(fa::dtype_name(fa::DType::kFloat32), "float32");
  EXPECT_EQ(fa::dtype_size(fa::DType::kFloat16), 2u);
  EXPECT_EQ(fa::dtype_size(fa::DType::kBFloat16), 2u);
  EXPECT_EQ(fa::dtype_size(fa::DType::kFloat32), 4u);
}

uint16_t to_16(fa::DType dtype, float f) {
  uint16_t h;
  fa::cpu::store_row(dtype, &f, 1, &h);
  return h;
}
float from_16(fa::DType dtype, uint16_t h) {
  float f;
  fa::cpu::load_row(dtype, &h, 1, &f);
  return f;
}

TEST(Conversion, RoundToNearestEvenAndSpecials) {
  const auto bf = fa::DType::kBFloat16, hf = fa::DType::kFloat16;
  EXPECT_EQ(to_16(bf, 1.0f), 0x3f80);
  EXPECT_EQ(to_16(bf, 1.0f + 0x1p-8f), 0x3f80);            // tie -> even
  EXPECT_EQ(to_16(bf, 1.0f + 0x1p-7f + 0x1p-8f), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(to_16(bf, -2.5f), 0xc020);
  EXPECT_TRUE(std::isnan(from_16(bf, to_16(bf, kNaN))));
  EXPECT_EQ(from_16(bf, 0x3fc0), 1.5f);
  EXPECT_EQ(to_16(hf, 1.0f), 0x3c00);
  EXPECT_EQ(to_16(hf, 1.0f + 0x1p-11f), 0x3c00);  // tie -> even
  EXPECT_EQ(to_16(hf, 65504.f), 0x7bff);
  EXPECT_EQ(to_16(hf, 65520.f), 0x7c00);   // rounds to inf
  EXPECT_EQ(to_16(hf, 0x1p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(from_16(hf, 0x0001), 0x1p-24f);
  EXPECT_EQ(from_16(hf, 0xfc00), -kInf);
  EXPECT_TRUE(std::isnan(from_16(hf, to_16(hf, kNaN))));
}

TEST(DropoutMask, MatchesDropoutKeep) {
  const int B = 2, H = 3, Sq = 17, Sk = 45;
  const float p = 0.3f;
  std::vector<uint8_t> mask(B * H * Sq * Sk, 7);
  ASSERT_TRUE(fa::dropout_mask(fa::Device::kCPU, 42, 9, p, B, H, Sq, Sk, mask.data()).ok());
  int64_t kept = 0;
  for (int bh = 0; bh < B * H; ++bh)
    for (int i = 0; i < Sq; ++i)
      for (int j = 0; j < Sk; ++j) {
        const uint8_t m = mask[(int64_t{bh} * Sq + i) * Sk + j];
        ASSERT_EQ(m, fa::dropout_keep(42, 9, bh, i, j, p) ? 1 : 0);
        kept += m;
      }
  EXPECT_NEAR(static_cast<double>(kept) / mask.size(), 1.0 - p, 0.03);
}

TEST(DropoutMask, RejectsBadArguments) {
  uint8_t m[4];
  const auto cpu = fa::Device::kCPU;
  expect_invalid(fa::dropout_mask(cpu, 1, 2, 1.0f, 1, 1, 2, 2, m), "dropout_p");
  expect_invalid(fa::dropout_mask(cpu, 1, 2, 0.5f, 0, 1, 2, 2, m), "batch");
  expect_invalid(fa::dropout_mask(cpu, 1, 2, 0.5f, 1, 0, 2, 2, m), "heads");
  expect_invalid(fa::dropout_mask(cpu, 1, 2, 0.5f, 1, 1, 0, 2, m), "seqlen_q");
  expect_invalid(fa::dropout_mask(cpu, 1, 2, 0.5f, 1, 1, 2, 0, m), "seqlen_k");
  expect_invalid(fa::dropout_mask(cpu, 1, 2, 0.5f, 1, 1, 2, 2, nullptr), "mask");
  expect_invalid(fa::dropout_mask(static_cast<fa::Device>(5), 1, 2, 0.5f, 1, 1, 2, 2, m), "device");
}

// Same results, bit for bit, whatever the thread count (1 thread: fused backward schedule; 7
// threads on 4 groups: split schedule).
TEST(Determinism, IndependentOfThreadCount) {
  Case c = small_case();
  c.seqlen_q = 150;
  c.seqlen_k = 300;
  c.causal = true;
  c.dropout = 0.1f;
  c.softcap = 4.f;
  c.alibi = 1;
  Problem a(c);
  fa::BackwardParams pa = a.backward_params();
  pa.num_threads = 1;
  ASSERT_TRUE(fa::forward(pa).ok());
  ASSERT_TRUE(fa::backward(pa).ok());
  for (int threads : {2, 7}) {
    Problem b(c);
    fa::BackwardParams pb = b.backward_params();
    pb.num_threads = threads;
    ASSERT_TRUE(fa::forward(pb).ok());
    ASSERT_TRUE(fa::backward(pb).ok());
    EXPECT_EQ(a.out.bytes, b.out.bytes) << threads << " threads";
    EXPECT_EQ(a.dq.bytes, b.dq.bytes) << threads << " threads";
    EXPECT_EQ(a.dk.bytes, b.dk.bytes) << threads << " threads";
    EXPECT_EQ(a.dv.bytes, b.dv.bytes) << threads << " threads";
  }
}

// Gradients of L = sum(out * dout) by central differences of the fp32 forward.
void finite_difference_check(const Case& c) {
  Problem pr(c);
  ASSERT_TRUE(fa::forward(pr.forward_params()).ok());
  ASSERT_TRUE(fa::backward(pr.backward_params()).ok());
  auto loss = [&]() {
    Problem probe = pr;
    probe.out.poison();
    EXPECT_TRUE(fa::forward(probe.forward_params()).ok());
    double l = 0;
    for (int b = 0; b < c.batch; ++b)
      for (int i = 0; i < c.seqlen_q; ++i)
        for (int h = 0; h < c.heads; ++h)
          for (int d = 0; d < c.dim; ++d) l += probe.out.get(b, i, h, d) * probe.dout.get(b, i, h, d);
    return l;
  };
  const double eps = 1e-2;
  struct Grad {
    Tensor* input;
    const Tensor* grad;
    const char* name;
  };
  for (const Grad g : {Grad{&pr.q, &pr.dq, "dq"}, Grad{&pr.k, &pr.dk, "dk"}, Grad{&pr.v, &pr.dv, "dv"}}) {
    double max_err = 0, max_grad = 0;
    for (int b = 0; b < g.input->batch; ++b)
      for (int i = 0; i < g.input->rows; ++i)
        for (int h = 0; h < g.input->heads; ++h)
          for (int d = 0; d < g.input->dim; ++d) {
            const double x = g.input->get(b, i, h, d);
            g.input->set(b, i, h, d, x + eps);
            const double up = loss();
            g.input->set(b, i, h, d, x - eps);
            const double down = loss();
            g.input->set(b, i, h, d, x);
            const double fd = (up - down) / (2 * eps), an = g.grad->get(b, i, h, d);
            max_err = std::max(max_err, std::abs(fd - an));
            max_grad = std::max(max_grad, std::abs(an));
          }
    EXPECT_LE(max_err, 2e-3 * std::max(1.0, max_grad)) << g.name << " vs finite differences";
  }
}

TEST(FiniteDifferences, AllOptionsTiny) {
  Case c;
  c.batch = 2;
  c.seqlen_q = 5;
  c.seqlen_k = 7;
  c.heads = 2;
  c.heads_k = 1;
  c.dim = 4;
  c.causal = true;
  c.window_left = 3;
  c.softcap = 1.5f;
  c.alibi = 2;
  finite_difference_check(c);
}

TEST(FiniteDifferences, Dropout) {
  Case c;
  c.seqlen_q = 6;
  c.seqlen_k = 5;
  c.heads = 2;
  c.heads_k = 2;
  c.dim = 3;
  c.dropout = 0.4f;
  finite_difference_check(c);
}

}  // namespace
}  // namespace fa_test
