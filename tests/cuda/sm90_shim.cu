// C ABI over flash_attention::sm90::forward, for tests/cuda/sm90_run.py (ctypes): runs the Hopper
// kernels without the op library. Build: nvcc -shared -Xcompiler -fPIC -I include -I src this file +
// the sm90 objects + src/common/{config,validate}.cpp -o sm90_shim.so
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/sm90/sm90_api.h"

namespace fa = flash_attention;

namespace {
fa::TensorStrides strides_at(const int64_t* s) { return {s[0], s[1], s[2]}; }
}  // namespace

// strides: 12 values, (batch, row, head) of q, k, v, out. Returns the StatusCode; msg gets the text.
extern "C" int fa_sm90_fwd(int dtype, int batch, int seqlen_q, int seqlen_k, int heads, int heads_k,
                           int head_dim, int64_t total_q, int64_t total_k, const void* q, const void* k,
                           const void* v, void* out, float* lse, const int64_t* strides,
                           const int32_t* cu_q, const int32_t* cu_k, float scale, int causal,
                           int window_left, int window_right, float softcap, const char* config,
                           void* stream, char* msg, int msg_len) {
  fa::ForwardParams p;
  p.device = fa::Device::kCUDA;
  p.dtype = static_cast<fa::DType>(dtype);
  p.batch = batch, p.seqlen_q = seqlen_q, p.seqlen_k = seqlen_k;
  p.num_heads = heads, p.num_heads_k = heads_k, p.head_dim = head_dim;
  p.total_q = total_q, p.total_k = total_k;
  p.q = q, p.k = k, p.v = v, p.out = out, p.softmax_lse = lse;
  p.q_strides = strides_at(strides), p.k_strides = strides_at(strides + 3);
  p.v_strides = strides_at(strides + 6), p.out_strides = strides_at(strides + 9);
  p.cu_seqlens_q = cu_q, p.cu_seqlens_k = cu_k;
  p.softmax_scale = scale, p.causal = causal != 0;
  p.window_left = window_left, p.window_right = window_right, p.softcap = softcap;
  p.stream = stream;
  fa::Status st = fa::KernelConfig::parse(config ? config : "", &p.config);
  if (st.ok()) st = fa::validate(p);
  if (st.ok()) {
    fa::normalize(p);
    st = fa::sm90::forward(p);
  }
  std::strncpy(msg, st.message().c_str(), msg_len - 1);
  msg[msg_len - 1] = '\0';
  return static_cast<int>(st.code());
}
