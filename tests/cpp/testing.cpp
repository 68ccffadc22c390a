#include "testing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/philox.h"
#include "cpu/common.h"

namespace fa_test {
Tensor::Tensor(DType dt, int b, int s, int h, int d, Layout layout)
    : dtype(dt), batch(b), rows(s), heads(h), dim(d) {
  int64_t size = 0;
  switch (layout) {
    case Layout::kContiguous:
      strides = {int64_t{s} * h * d, int64_t{h} * d, d};
      size = int64_t{b} * s * h * d;
      break;
    case Layout::kPadded:  // gaps after each head, row and batch
      strides.head = d + 3;
      strides.row = h * strides.head + 5;
      strides.batch = s * strides.row + 7;
      size = b * strides.batch;
      break;
    case Layout::kHeadMajor:  // memory order (B, H, S, D)
      strides = {int64_t{h} * s * d, d, int64_t{s} * d};
      size = int64_t{b} * s * h * d;
      break;
  }
  bytes.assign(std::max<int64_t>(size, 1) * flash_attention::dtype_size(dt), 0);
}

// Conversions reuse the library's (round to nearest even; checked in test_api.cpp, Conversion.*).
double Tensor::get(int b, int i, int h, int d) const {
  float f;
  flash_attention::cpu::load_row(
      dtype, flash_attention::cpu::element(bytes.data(), dtype, offset(b, i, h) + d), 1, &f);
  return f;
}

void Tensor::set(int b, int i, int h, int d, double value) {
  const float f = static_cast<float>(value);
  flash_attention::cpu::store_row(dtype, &f, 1,
                                  flash_attention::cpu::element(bytes.data(), dtype, offset(b, i, h) + d));
}

void Tensor::fill_random(std::mt19937& rng, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < rows; ++i)
      for (int h = 0; h < heads; ++h)
        for (int d = 0; d < dim; ++d) set(b, i, h, d, normal(rng));
}

void Tensor::poison() { std::memset(bytes.data(), 0xff, bytes.size()); }

bool Tensor::gaps_untouched() const {
  const std::size_t es = flash_attention::dtype_size(dtype);
  std::vector<bool> owned(bytes.size() / es, false);
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < rows; ++i)
      for (int h = 0; h < heads; ++h)
        for (int d = 0; d < dim; ++d) owned[offset(b, i, h) + d] = true;
  for (std::size_t e = 0; e < owned.size(); ++e)
    for (std::size_t byte = 0; !owned[e] && byte < es; ++byte)
      if (bytes[e * es + byte] != 0xff) return false;
  return true;
}

Problem::Problem(const Case& cs, uint32_t rng_seed) : c(cs) {
  const bool varlen = !c.lens_q.empty();
  batch = varlen ? static_cast<int>(c.lens_q.size()) : c.batch;
  int total_q = 0, total_k = 0;
  if (varlen) {
    cu_q = {0};
    cu_k = {0};
    for (int b = 0; b < batch; ++b) {
      cu_q.push_back(cu_q.back() + c.lens_q[b]);
      cu_k.push_back(cu_k.back() + c.lens_k[b]);
    }
    total_q = cu_q.back();
    total_k = cu_k.back();
  }
  const int tb = varlen ? 1 : batch, rq = varlen ? total_q : c.seqlen_q, rk = varlen ? total_k : c.seqlen_k;
  q = Tensor(c.dtype, tb, rq, c.heads, c.dim, c.layout);
  k = Tensor(c.dtype, tb, rk, c.heads_k, c.dim, c.layout);
  v = Tensor(c.dtype, tb, rk, c.heads_k, c.dim, c.layout);
  out = Tensor(c.dtype, tb, rq, c.heads, c.dim, c.layout);
  dout = Tensor(c.dtype, tb, rq, c.heads, c.dim, c.layout);
  dq = Tensor(c.dtype, tb, rq, c.heads, c.dim, c.layout);
  dk = Tensor(c.dtype, tb, rk, c.heads_k, c.dim, c.layout);
  dv = Tensor(c.dtype, tb, rk, c.heads_k, c.dim, c.layout);
  std::mt19937 rng(rng_seed);
  q.fill_random(rng);
  k.fill_random(rng);
  v.fill_random(rng);
  dout.fill_random(rng);
  out.poison();
  dq.poison();
  dk.poison();
  dv.poison();
  lse.assign(varlen ? int64_t{c.heads} * total_q : int64_t{batch} * c.heads * c.seqlen_q + 1,
             std::numeric_limits<float>::quiet_NaN());
  if (c.alibi) {
    std::uniform_real_distribution<float> slope(0.05f, 1.0f);
    alibi.resize(c.alibi == 2 ? batch * (c.heads + 1) : c.heads);  // (B, H) with batch stride H + 1
    for (float& a : alibi) a = slope(rng);
  }
}

int64_t Problem::lse_index(int b, int h, int i) const {
  if (!c.lens_q.empty()) return int64_t{h} * cu_q.back() + cu_q[b] + i;
  return (int64_t{b} * c.heads + h) * c.seqlen_q + i;
}

flash_attention::ForwardParams Problem::forward_params() {
  flash_attention::ForwardParams p;
  p.device = flash_attention::Device::kCPU;
  p.dtype = c.dtype;
  p.batch = batch;
  p.seqlen_q = c.seqlen_q;
  p.seqlen_k = c.seqlen_k;
  if (!c.lens_q.empty()) {
    p.seqlen_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
    p.seqlen_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
    p.total_q = cu_q.back();
    p.total_k = cu_k.back();
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
  }
  p.num_heads = c.heads;
  p.num_heads_k = c.heads_k;
  p.head_dim = c.dim;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.softmax_lse = lse.data();
  p.q_strides = q.strides;
  p.k_strides = k.strides;
  p.v_strides = v.strides;
  p.out_strides = out.strides;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(c.dim));
  p.causal = c.causal;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  p.softcap = c.softcap;
  if (c.alibi) {
    p.alibi_slopes = alibi.data();
    p.alibi_batch_stride = c.alibi == 2 ? c.heads + 1 : 0;
  }
  p.dropout_p = c.dropout;
  p.philox_seed = seed;
  p.philox_offset = offset;
  return p;
}

flash_attention::BackwardParams Problem::backward_params() {
  flash_attention::BackwardParams p;
  static_cast<flash_attention::ForwardParams&>(p) = forward_params();
  p.dout = dout.data();
  p.dout_strides = dout.strides;
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.dq_strides = dq.strides;
  p.dk_strides = dk.strides;
  p.dv_strides = dv.strides;
  return p;
}

namespace {

// Reference for one (sequence, query head).
void reference_head(const Problem& p, int b, int h, bool grads, RefResult& r) {
  const Case& c = p.c;
  const int sq = p.len_q(b), sk = p.len_k(b), D = c.dim, H = c.heads, Hk = c.heads_k;
  const int hk = h / (H / Hk), tb = p.tb(b);
  const double sm_scale = static_cast<float>(1.0 / std::sqrt(D));  // the float the API receives
  const int left = c.window_left, right = c.causal ? 0 : c.window_right;
  const double slope = c.alibi == 0 ? 0.0 : p.alibi[c.alibi == 2 ? b * (H + 1) + h : h];
  const double keep_scale = 1.0 / (1.0 - c.dropout);
  const int64_t bh = int64_t{b} * H + h;
  for (int i = 0; i < sq; ++i) {
    std::vector<double> s(sk), tanh_v(sk, 0.0);
    std::vector<bool> visible(sk);
    double mx = -INFINITY;
    for (int j = 0; j < sk; ++j) {
      visible[j] = !((right >= 0 && j > i + sk - sq + right) || (left >= 0 && j < i + sk - sq - left));
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += p.q.get(tb, p.row_q(b, i), h, d) * p.k.get(tb, p.row_k(b, j), hk, d);
      double x = dot * sm_scale;
      if (c.softcap > 0) {
        tanh_v[j] = std::tanh(x / c.softcap);
        x = c.softcap * tanh_v[j];
      }
      x -= slope * std::abs(i + sk - sq - j);
      s[j] = x;
      if (visible[j]) mx = std::max(mx, x);
    }
    double sum = 0;
    for (int j = 0; j < sk; ++j) sum += visible[j] ? std::exp(s[j] - mx) : 0.0;
    r.lse[b][int64_t{h} * sq + i] = sum > 0 ? mx + std::log(sum) : INFINITY;
    std::vector<double> prob(sk, 0.0), keep(sk, 1.0);
    for (int j = 0; j < sk; ++j) {
      if (sum > 0 && visible[j]) prob[j] = std::exp(s[j] - mx) / sum;
      if (c.dropout > 0) {
        keep[j] = flash_attention::dropout_keep(p.seed, p.offset, bh, i, j, c.dropout) ? keep_scale : 0.0;
      }
    }
    double* o = &r.out[b][(int64_t{i} * H + h) * D];
    for (int d = 0; d < D; ++d) {
      double acc = 0;
      for (int j = 0; j < sk; ++j) acc += prob[j] * keep[j] * p.v.get(tb, p.row_k(b, j), hk, d);
      o[d] = acc;
    }
    if (!grads) continue;
    std::vector<double> dprob(sk);
    double delta = 0;
    for (int d = 0; d < D; ++d) delta += p.dout.get(tb, p.row_q(b, i), h, d) * o[d];
    for (int j = 0; j < sk; ++j) {
      double dp = 0;
      for (int d = 0; d < D; ++d)
        dp += p.dout.get(tb, p.row_q(b, i), h, d) * p.v.get(tb, p.row_k(b, j), hk, d);
      for (int d = 0; d < D; ++d) {
        r.dv[b][(int64_t{j} * Hk + hk) * D + d] += prob[j] * keep[j] * p.dout.get(tb, p.row_q(b, i), h, d);
      }
      double ds = prob[j] * (dp * keep[j] - delta);
      if (c.softcap > 0) ds *= 1.0 - tanh_v[j] * tanh_v[j];
      ds *= sm_scale;
      for (int d = 0; d < D; ++d) {
        r.dq[b][(int64_t{i} * H + h) * D + d] += ds * p.k.get(tb, p.row_k(b, j), hk, d);
        r.dk[b][(int64_t{j} * Hk + hk) * D + d] += ds * p.q.get(tb, p.row_q(b, i), h, d);
      }
    }
  }
}

}  // namespace

RefResult reference(const Problem& p, bool with_grads) {
  RefResult r;
  const Case& c = p.c;
  for (int b = 0; b < p.batch; ++b) {
    const int sq = p.len_q(b), sk = p.len_k(b);
    r.out.emplace_back(int64_t{sq} * c.heads * c.dim, 0.0);
    r.lse.emplace_back(int64_t{sq} * c.heads, 0.0);
    r.dq.emplace_back(int64_t{sq} * c.heads * c.dim, 0.0);
    r.dk.emplace_back(int64_t{sk} * c.heads_k * c.dim, 0.0);
    r.dv.emplace_back(int64_t{sk} * c.heads_k * c.dim, 0.0);
    for (int h = 0; h < c.heads; ++h) reference_head(p, b, h, with_grads, r);
  }
  return r;
}

}  // namespace fa_test
