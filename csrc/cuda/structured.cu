// CUDA kernels of the structured-block ops (contract in include/ftcore/structured.h): data movement only, one
// thread per element, consecutive threads on consecutive output elements (coalesced writes); the reads follow
// the index. 64-bit offsets, current stream, device guard, a launch check after every launch; an index out of
// range or repeated trips a device-side assert and is never dereferenced.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ftcore/checks.h"
#include "ftcore/dispatch.h"
#include "ftcore/shapes.h"
#include "ftcore/structured.h"

namespace ftcore {
namespace {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// Entry t of a block index, or false (after a device-side assert) when it is out of range or not above entry t-1:
// a repeat would make two threads write one element.
template <typename index_t>
__device__ __forceinline__ bool checked(const index_t* idx, int64_t t, int64_t limit, int64_t& out) {
  out = static_cast<int64_t>(idx[t]);
  const bool ok = out >= 0 && out < limit && (t == 0 || static_cast<int64_t>(idx[t - 1]) < out);
  CUDA_KERNEL_ASSERT(ok && "ftcore: structured-block index out of range or not strictly increasing");
  return ok;
}

template <typename scalar_t, typename index_t>
__global__ void gather_columns_kernel(const scalar_t* __restrict__ src, int64_t rs, int64_t cs, int64_t features,
                                      const index_t* __restrict__ col, int64_t k, int64_t total,
                                      scalar_t* __restrict__ dst) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t n = e / k, j = e - n * k;
  int64_t c;
  if (!checked(col, j, features, c)) return;
  dst[e] = src[n * rs + c * cs];
}

template <typename scalar_t, typename index_t>
__global__ void scatter_columns_kernel(const scalar_t* __restrict__ src, int64_t rs, int64_t cs, int64_t features,
                                       const index_t* __restrict__ col, int64_t k, int64_t total,
                                       scalar_t* __restrict__ dst) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t n = e / k, j = e - n * k;
  int64_t c;
  if (!checked(col, j, features, c)) return;
  dst[n * features + c] = src[n * rs + j * cs];
}

// Element e of the block (row-major, block_cols wide) sits at this offset of the strided weight, or -1.
template <typename index_t>
__device__ __forceinline__ int64_t block_offset(int64_t e, int64_t block_cols, const index_t* idx, bool rows,
                                                int64_t out, int64_t in, int64_t s0, int64_t s1) {
  const int64_t r = e / block_cols, c = e - r * block_cols;
  int64_t w_row = r, w_col = c;
  if (rows ? !checked(idx, r, out, w_row) : !checked(idx, c, in, w_col)) return -1;
  return w_row * s0 + w_col * s1;
}

// `block` null: restore, i.e. write the start value exactly.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void block_scatter_kernel(scalar_t* __restrict__ w, int64_t out, int64_t in, int64_t s0, int64_t s1,
                                     const index_t* __restrict__ idx, bool rows, int64_t block_cols, int64_t total,
                                     const acc_t* __restrict__ block, const scalar_t* __restrict__ base, acc_t alpha) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t off = block_offset(e, block_cols, idx, rows, out, in, s0, s1);
  if (off < 0) return;
  const acc_t start = base ? static_cast<acc_t>(base[e]) : static_cast<acc_t>(w[off]);
  w[off] = static_cast<scalar_t>(block ? start + alpha * block[e] : start);
}

template <typename scalar_t, typename index_t>
__global__ void block_gather_kernel(const scalar_t* __restrict__ w, int64_t out, int64_t in, int64_t s0, int64_t s1,
                                    const index_t* __restrict__ idx, bool rows, int64_t block_cols, int64_t total,
                                    scalar_t* __restrict__ result) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t off = block_offset(e, block_cols, idx, rows, out, in, s0, s1);
  if (off >= 0) result[e] = w[off];
}


}  // namespace

at::Tensor gather_columns_cuda(const at::Tensor& input, const at::Tensor& columns) {
  constexpr const char* op = "gather_columns";
  check_gather_columns_args(input, columns);
  const at::cuda::OptionalCUDAGuard guard(input.device());
  const auto idx = columns.contiguous();
  const int64_t k = idx.numel();
  auto result = at::empty(with_last_dim(input, k), input.options());
  if (result.numel() == 0) return result;
  const auto x = as_rows(input);
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      gather_columns_kernel<scalar_t, index_t><<<blocks_for(result.numel()), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1), idx.data_ptr<index_t>(), k, result.numel(),
          result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

at::Tensor scatter_columns_cuda(const at::Tensor& values, const at::Tensor& columns, int64_t features) {
  constexpr const char* op = "scatter_columns";
  check_scatter_columns_args(values, columns, features);
  const at::cuda::OptionalCUDAGuard guard(values.device());
  const auto idx = columns.contiguous();
  const int64_t k = idx.numel();
  auto result = at::zeros(with_last_dim(values, features), values.options());
  const auto v = as_rows(values);
  if (result.numel() == 0 || k == 0 || v.size(0) == 0) return result;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(values.scalar_type(), op, [&] {
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      scatter_columns_kernel<scalar_t, index_t><<<blocks_for(v.numel()), kThreads, 0, stream>>>(
          v.data_ptr<scalar_t>(), v.stride(0), v.stride(1), features, idx.data_ptr<index_t>(), k, v.numel(),
          result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

void structured_block_scatter_cuda(at::Tensor& weight, const at::Tensor& index, const at::Tensor& block, double alpha,
                                   const std::optional<at::Tensor>& base, bool rows) {
  constexpr const char* op = "structured_block_scatter_";
  check_block_scatter_args(weight, index, block, base, rows);
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  const auto idx = index.contiguous();
  const auto [br, bc] = block_shape(weight, idx, rows);
  const int64_t total = br * bc;
  if (total == 0) return;
  const bool restore = alpha == 0.0;  // leave the start value exactly; block is not read
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto blk = restore ? at::Tensor() : block.to(acc).contiguous();
  const auto base_c = base ? base->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      block_scatter_kernel<scalar_t, acc_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          weight.data_ptr<scalar_t>(), weight.size(0), weight.size(1), weight.stride(0), weight.stride(1),
          idx.data_ptr<index_t>(), rows, bc, total, restore ? nullptr : blk.data_ptr<acc_t>(),
          base ? base_c.data_ptr<scalar_t>() : nullptr, static_cast<acc_t>(alpha));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor structured_block_gather_cuda(const at::Tensor& weight, const at::Tensor& index, bool rows) {
  constexpr const char* op = "structured_block_gather";
  check_block_args(weight, index, rows, op);
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  const auto idx = index.contiguous();
  const auto [br, bc] = block_shape(weight, idx, rows);
  auto result = at::empty({br, bc}, weight.options());
  if (result.numel() == 0) return result;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      block_gather_kernel<scalar_t, index_t><<<blocks_for(result.numel()), kThreads, 0, stream>>>(
          weight.data_ptr<scalar_t>(), weight.size(0), weight.size(1), weight.stride(0), weight.stride(1),
          idx.data_ptr<index_t>(), rows, bc, result.numel(), result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

TORCH_LIBRARY_IMPL(ftcore, CUDA, m) {
  m.impl("gather_columns", &gather_columns_cuda);
  m.impl("scatter_columns", &scatter_columns_cuda);
  m.impl("structured_block_scatter_", &structured_block_scatter_cuda);
  m.impl("structured_block_gather", &structured_block_gather_cuda);
}

}  // namespace ftcore
