// Minimal use of the C++ API: random bf16 q/k/v, causal forward on the CPU, checksum and time.
//   usage: fa_example_basic [batch seqlen heads head_dim]
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "flash_attention/flash_attention.h"

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  const int B = argc > 4 ? std::atoi(argv[1]) : 2, S = argc > 4 ? std::atoi(argv[2]) : 1024;
  const int H = argc > 4 ? std::atoi(argv[3]) : 8, D = argc > 4 ? std::atoi(argv[4]) : 64;
  const int64_t n = int64_t{B} * S * H * D;
  std::vector<uint16_t> q(n), k(n), v(n), out(n);
  std::vector<float> lse(int64_t{B} * H * S);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = to_bf16(normal(rng));

  flash_attention::ForwardParams p;
  p.device = flash_attention::Device::kCPU;
  p.dtype = flash_attention::DType::kBFloat16;
  p.batch = B;
  p.seqlen_q = p.seqlen_k = S;
  p.num_heads = p.num_heads_k = H;
  p.head_dim = D;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.softmax_lse = lse.data();
  const flash_attention::TensorStrides strides{int64_t{S} * H * D, int64_t{H} * D, D};  // (B, S, H, D)
  p.q_strides = p.k_strides = p.v_strides = p.out_strides = strides;
  p.softmax_scale = 1.f / std::sqrt(static_cast<float>(D));
  p.causal = true;

  const auto t0 = std::chrono::steady_clock::now();
  const flash_attention::Status status = flash_attention::forward(p);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!status.ok()) {
    std::fprintf(stderr, "forward failed: %s\n", status.message().c_str());
    return 1;
  }
  double checksum = 0;
  for (uint16_t x : out) checksum += from_bf16(x);
  const double tflops = 4.0 * B * H * S * S * D / 2 / (ms * 1e-3) / 1e12;
  std::printf("B=%d S=%d H=%d D=%d causal bf16: checksum %.6f, %.2f ms, %.3f TFLOP/s\n", B, S, H, D, checksum,
              ms, tflops);
  return 0;
}
