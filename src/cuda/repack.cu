#include "cuda/repack.h"

#include <string>

namespace flash_attention::cuda {
namespace {

constexpr int kThreads = 256;

// One thread per packed element; kPack: strided -> packed, else packed -> strided.
template <bool kPack>
__global__ void repack_kernel(StridedView view, uint16_t* packed, int padded_dim, int64_t count) {
  auto* strided = static_cast<uint16_t*>(const_cast<void*>(view.data));
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < count;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int col = int(idx % padded_dim);
    const int64_t bsh = idx / padded_dim;
    const int h = int(bsh % view.heads);
    const int64_t bs = bsh / view.heads;
    const int64_t row = bs % view.rows;
    const int64_t b = bs / view.rows;
    const int64_t at = b * view.batch_stride + row * view.row_stride + h * view.head_stride + col;
    if (kPack) {
      packed[idx] = col < view.head_dim ? strided[at] : uint16_t(0);
    } else if (col < view.head_dim) {
      strided[at] = packed[idx];
    }
  }
}

template <bool kPack>
Status launch(const StridedView& view, uint16_t* packed, int padded_dim, cudaStream_t stream) {
  const int64_t count = int64_t(view.batch) * view.rows * view.heads * padded_dim;
  if (count == 0) return Status::Ok();
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 65535);
  repack_kernel<kPack><<<unsigned(blocks), kThreads, 0, stream>>>(view, packed, padded_dim, count);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::CudaError(std::string("flash_attention repack: ") + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace

Status pack(const StridedView& src, void* dst, int padded_dim, cudaStream_t stream) {
  return launch<true>(src, static_cast<uint16_t*>(dst), padded_dim, stream);
}

Status unpack(const void* src, int padded_dim, const StridedView& dst, cudaStream_t stream) {
  return launch<false>(dst, static_cast<uint16_t*>(const_cast<void*>(src)), padded_dim, stream);
}

}  // namespace flash_attention::cuda
