// Runs representative CUDA forward calls through the public C++ API, for compute-sanitizer:
//   g++ -O1 -std=c++17 tests/cuda/sanitize_forward.cpp -Iinclude -I/usr/local/cuda/include \
//       build/<name>/libflash_attention.a -L/usr/local/cuda/lib64 -lcudart -fopenmp -o sanitize_forward
//   compute-sanitizer --tool memcheck|racecheck ./sanitize_forward
// (no correctness checks here: tests/python/test_cuda_forward.py does those). Exits 1 on any error.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "flash_attention/flash_attention.h"

namespace fa = flash_attention;

namespace {

struct Case {
  const char* name;
  int batch, seqlen_q, seqlen_k, heads, heads_k, head_dim;
  bool causal;
  int window_left, window_right;
  float softcap, dropout_p;
  bool alibi, varlen;
};

void* device_random(size_t elems) {
  std::vector<uint16_t> host(elems);
  for (auto& x : host) x = uint16_t(0x3000 + (std::rand() & 0x0fff));  // fp16 values in [0.125, 0.5)
  void* ptr = nullptr;
  cudaMalloc(&ptr, elems * 2);
  cudaMemcpy(ptr, host.data(), elems * 2, cudaMemcpyHostToDevice);
  return ptr;
}

bool run(const Case& c) {
  fa::ForwardParams p;
  p.device = fa::Device::kCUDA;
  p.dtype = fa::DType::kFloat16;
  p.batch = c.batch, p.seqlen_q = c.seqlen_q, p.seqlen_k = c.seqlen_k;
  p.num_heads = c.heads, p.num_heads_k = c.heads_k, p.head_dim = c.head_dim;
  const int64_t rows_q = int64_t(c.batch) * c.seqlen_q, rows_k = int64_t(c.batch) * c.seqlen_k;
  p.q = device_random(rows_q * c.heads * c.head_dim);
  p.k = device_random(rows_k * c.heads_k * c.head_dim);
  p.v = device_random(rows_k * c.heads_k * c.head_dim);
  cudaMalloc(&p.out, rows_q * c.heads * c.head_dim * 2);
  cudaMalloc(&p.softmax_lse, rows_q * c.heads * sizeof(float));
  const int64_t hd_q = int64_t(c.heads) * c.head_dim, hd_k = int64_t(c.heads_k) * c.head_dim;
  p.q_strides = p.out_strides = {c.seqlen_q * hd_q, hd_q, c.head_dim};
  p.k_strides = p.v_strides = {c.seqlen_k * hd_k, hd_k, c.head_dim};
  int32_t* cu = nullptr;
  if (c.varlen) {  // the same rows as `batch` equal sequences
    std::vector<int32_t> cu_q, cu_k;
    for (int b = 0; b <= c.batch; ++b) cu_q.push_back(b * c.seqlen_q), cu_k.push_back(b * c.seqlen_k);
    cudaMalloc(&cu, 2 * cu_q.size() * sizeof(int32_t));
    cudaMemcpy(cu, cu_q.data(), cu_q.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(cu + cu_q.size(), cu_k.data(), cu_k.size() * 4, cudaMemcpyHostToDevice);
    p.cu_seqlens_q = cu, p.cu_seqlens_k = cu + cu_q.size();
    p.total_q = rows_q, p.total_k = rows_k;
  }
  float* slopes = nullptr;
  if (c.alibi) {
    std::vector<float> s(c.heads, 0.25f);
    cudaMalloc(&slopes, c.heads * sizeof(float));
    cudaMemcpy(slopes, s.data(), c.heads * sizeof(float), cudaMemcpyHostToDevice);
    p.alibi_slopes = slopes;
  }
  p.softmax_scale = 0.125f;
  p.causal = c.causal, p.window_left = c.window_left, p.window_right = c.window_right;
  p.softcap = c.softcap, p.dropout_p = c.dropout_p, p.philox_seed = 42;
  const fa::Status st = fa::forward(p);
  const cudaError_t err = cudaDeviceSynchronize();
  std::printf("%-22s %s %s\n", c.name, st.ok() ? "ok" : st.message().c_str(), cudaGetErrorString(err));
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.out), static_cast<const void*>(p.softmax_lse),
                          static_cast<const void*>(cu), static_cast<const void*>(slopes)}) {
    cudaFree(const_cast<void*>(ptr));
  }
  return st.ok() && err == cudaSuccess;
}

}  // namespace

int main() {
  const Case cases[] = {
      {"d64 113x203", 2, 113, 203, 4, 4, 64, false, -1, -1, 0.f, 0.f, false, false},
      {"d128 causal 128x217", 2, 128, 217, 4, 2, 128, true, -1, -1, 0.f, 0.f, false, false},
      {"d256 causal 300x300", 1, 300, 300, 2, 1, 256, true, -1, -1, 0.f, 0.f, false, false},
      {"d96 window", 1, 257, 190, 2, 2, 96, false, 40, 8, 0.f, 0.f, false, false},
      {"d64 extras", 2, 130, 150, 2, 2, 64, true, -1, -1, 3.f, 0.2f, true, false},
      {"d59 packed copy", 1, 77, 91, 2, 2, 59, false, -1, -1, 0.f, 0.f, false, false},
      {"d128 varlen", 3, 65, 99, 2, 2, 128, true, -1, -1, 0.f, 0.f, false, true},
      {"d32 1x1", 1, 1, 1, 1, 1, 32, false, -1, -1, 0.f, 0.f, false, false},
  };
  bool ok = true;
  for (const Case& c : cases) ok = run(c) && ok;
  return ok ? 0 : 1;
}
