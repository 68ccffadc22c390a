// Test helpers: host tensors in any dtype and layout, a case description, and a naive
// double-precision reference of the attention semantics in flash_attention.h.
#pragma once

#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "flash_attention/flash_attention.h"

namespace fa_test {

using flash_attention::DType;
using flash_attention::TensorStrides;

enum class Layout { kContiguous, kPadded, kHeadMajor };  // (B,S,H,D) / padded strides / (B,H,S,D)

// A (B, S, H, D) or varlen (total, H, D) tensor in `dtype`, with `layout` strides.
struct Tensor {
  DType dtype = DType::kFloat32;
  int batch = 0, rows = 0, heads = 0, dim = 0;  // varlen: batch = 1, rows = total
  TensorStrides strides;
  std::vector<uint8_t> bytes;

  Tensor() = default;
  Tensor(DType dtype, int batch, int rows, int heads, int dim, Layout layout);
  int64_t offset(int b, int i, int h) const { return b * strides.batch + i * strides.row + h * strides.head; }
  double get(int b, int i, int h, int d) const;
  void set(int b, int i, int h, int d, double value);  // rounds to dtype
  void fill_random(std::mt19937& rng, double scale = 1.0);
  void poison();                // 0xFF bytes everywhere (NaN in every dtype)
  bool gaps_untouched() const;  // bytes outside the tensor's elements (stride gaps) still 0xFF
  void* data() { return bytes.data(); }
};

struct Case {
  std::string name;
  DType dtype = DType::kFloat32;
  int batch = 1, seqlen_q = 16, seqlen_k = 16, heads = 1, heads_k = 1, dim = 32;
  bool causal = false;
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  int alibi = 0;  // 0 none, 1 (H), 2 (B, H)
  float dropout = 0.f;
  std::vector<int> lens_q, lens_k;  // varlen when non-empty
  Layout layout = Layout::kContiguous;
  bool backward = true;
};
inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// Inputs + outputs of one call, laid out as the case says.
struct Problem {
  Case c;
  int batch = 0;  // number of sequences
  Tensor q, k, v, out, dout, dq, dk, dv;
  std::vector<float> lse, alibi;
  std::vector<int32_t> cu_q, cu_k;
  uint64_t seed = 1234, offset = 77;

  explicit Problem(const Case& c, uint32_t rng_seed = 1);
  int len_q(int b) const { return c.lens_q.empty() ? c.seqlen_q : c.lens_q[b]; }
  int len_k(int b) const { return c.lens_k.empty() ? c.seqlen_k : c.lens_k[b]; }
  // (tensor batch index, tensor row) of in-sequence row i of sequence b.
  int tb(int b) const { return c.lens_q.empty() ? b : 0; }
  int row_q(int b, int i) const { return c.lens_q.empty() ? i : cu_q[b] + i; }
  int row_k(int b, int j) const { return c.lens_k.empty() ? j : cu_k[b] + j; }
  int64_t lse_index(int b, int h, int i) const;
  flash_attention::ForwardParams forward_params();
  flash_attention::BackwardParams backward_params();
};

// Double-precision reference on the dtype-rounded inputs, one vector per sequence:
// out/dq [(i * H + h) * D + d], dk/dv [(j * Hk + h) * D + d], lse [h * Sq + i] (+inf: no key).
struct RefResult {
  std::vector<std::vector<double>> out, lse, dq, dk, dv;
};
RefResult reference(const Problem& p, bool with_grads);

}  // namespace fa_test
