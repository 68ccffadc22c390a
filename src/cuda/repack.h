// Strided <-> packed copies of (batch, rows, heads, head_dim) 16-bit tensors. The forward kernels load
// 16-byte chunks, so inputs whose head dim or strides are not multiples of 8 elements (or whose
// pointers are not 16-byte aligned) run on a packed copy with the head dim zero-padded to a multiple of 8.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_attention/flash_attention.h"

namespace flash_attention::cuda {

struct StridedView {
  const void* data;
  int64_t batch_stride, row_stride, head_stride;  // elements
  int batch;                                      // varlen: 1 (rows = total)
  int64_t rows;                                   // per batch
  int heads, head_dim;
};

// dst (batch, rows, heads, padded_dim) contiguous <- src; columns >= head_dim are zero.
Status pack(const StridedView& src, void* dst, int padded_dim, cudaStream_t stream);
// dst (strided, first head_dim columns) <- src (batch, rows, heads, padded_dim) contiguous.
Status unpack(const void* src, int padded_dim, const StridedView& dst, cudaStream_t stream);

}  // namespace flash_attention::cuda
