// Runs one small fp32 attention through the installed library and checks one output row
// against a direct computation; exits non-zero on any mismatch.
#include <cmath>
#include <cstdio>
#include <vector>

#include "flash_attention/flash_attention.h"

int main() {
  const int S = 5, D = 4;
  std::vector<float> q(S * D), k(S * D), v(S * D), out(S * D), lse(S);
  for (int i = 0; i < S * D; ++i) {
    q[i] = std::sin(0.7f * i);
    k[i] = std::cos(0.3f * i);
    v[i] = 0.1f * i;
  }
  flash_attention::ForwardParams p;
  p.device = flash_attention::Device::kCPU;
  p.dtype = flash_attention::DType::kFloat32;
  p.batch = p.num_heads = p.num_heads_k = 1;
  p.seqlen_q = p.seqlen_k = S;
  p.head_dim = D;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.softmax_lse = lse.data();
  p.q_strides = p.k_strides = p.v_strides = p.out_strides = {S * D, D, D};
  p.softmax_scale = 0.5f;
  const flash_attention::Status status = flash_attention::forward(p);
  if (!status.ok()) {
    std::fprintf(stderr, "forward: %s\n", status.message().c_str());
    return 1;
  }
  // Last query row, computed directly.
  double w[S], sum = 0;
  for (int j = 0; j < S; ++j) {
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += q[(S - 1) * D + d] * k[j * D + d];
    w[j] = std::exp(0.5 * dot);
    sum += w[j];
  }
  for (int d = 0; d < D; ++d) {
    double want = 0;
    for (int j = 0; j < S; ++j) want += w[j] / sum * v[j * D + d];
    if (std::abs(want - out[(S - 1) * D + d]) > 1e-5) {
      std::fprintf(stderr, "mismatch at d=%d: %f vs %f\n", d, out[(S - 1) * D + d], want);
      return 1;
    }
  }
  p.head_dim = 0;
  if (flash_attention::forward(p).ok()) {
    std::fprintf(stderr, "head_dim = 0 was accepted\n");
    return 1;
  }
  std::printf("consumer OK (cuda built: %s)\n", flash_attention::cuda_built() ? "yes" : "no");
  return 0;
}
