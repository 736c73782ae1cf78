// CUDA row kernels of linear_cross_entropy (include/ftcore/linear_cross_entropy.h). One block a row (a whole
// vocabulary), its threads striding the row with coalesced loads; the logits stay in their own dtype (bf16/fp16
// straight from the GEMM) and every sum is taken in fp32 (fp64 for float64). The gradient pass writes
// coef · (softmax − onehot) in one sweep, the one-hot term by the thread that owns that element, so no element
// is written twice. Current stream, device guard, a launch check after every launch.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ftcore/dispatch.h"
#include "ftcore/linear_cross_entropy.h"

namespace ftcore {
namespace {

constexpr int kThreads = 512;

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's reduction of each thread's v (max or sum), returned to every thread.
template <bool kMax, typename T>
__device__ T block_reduce(T v, T* shared) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < (blockDim.x >> 5) ? shared[lane] : (kMax ? -INFINITY : T(0));
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) shared[0] = w;
  }
  __syncthreads();
  const T result = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return result;
}

template <typename scalar_t, typename acc_t>
__global__ void row_logsumexp_kernel(const scalar_t* __restrict__ logits, int64_t vocab, acc_t* __restrict__ lse) {
  __shared__ acc_t shared[32];
  const scalar_t* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  acc_t m = -INFINITY, bad = 0;  // bad: Σ (x − x), NaN when the row holds a NaN or an infinity
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(row[j]);
    m = fmax(m, v);
    bad += v - v;
  }
  m = block_reduce<true>(m, shared);
  bad = block_reduce<false>(bad, shared);
  acc_t sum = 0;
  if (m > -INFINITY) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp(static_cast<acc_t>(row[j]) - m);
  }
  sum = block_reduce<false>(sum, shared);
  if (threadIdx.x == 0) lse[blockIdx.x] = (m > -INFINITY ? m + log(sum) : m) + bad;
}

template <typename scalar_t, typename acc_t>
__global__ void softmax_grad_rows_kernel(scalar_t* __restrict__ logits, int64_t vocab, const acc_t* __restrict__ lse,
                                         const acc_t* __restrict__ coef, const int64_t* __restrict__ labels) {
  scalar_t* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const acc_t c = coef[blockIdx.x], m = lse[blockIdx.x];
  const int64_t y = labels[blockIdx.x];  // outside [0, vocab): no one-hot term
  if (c == acc_t(0)) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = scalar_t(0);
    return;
  }
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const acc_t p = exp(static_cast<acc_t>(row[j]) - m);
    row[j] = static_cast<scalar_t>(c * (j == y ? p - acc_t(1) : p));
  }
}

}  // namespace

at::Tensor lce_row_logsumexp_cuda(const at::Tensor& logits) {
  TORCH_INTERNAL_ASSERT(logits.dim() == 2 && logits.is_contiguous());
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lse = at::empty({rows}, logits.options().dtype(acc));
  if (rows == 0) return lse;
  TORCH_CHECK_VALUE(rows < (int64_t(1) << 31), "linear_cross_entropy: too many tokens in one chunk");
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(logits.scalar_type(), "linear_cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_logsumexp_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(logits.const_data_ptr<scalar_t>(), vocab,
                                                                         lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return lse;
}

void lce_softmax_grad_rows_cuda(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& coef,
                                const at::Tensor& labels) {
  TORCH_INTERNAL_ASSERT(logits.dim() == 2 && logits.is_contiguous() && lse.is_contiguous() && coef.is_contiguous());
  TORCH_INTERNAL_ASSERT(labels.scalar_type() == at::kLong && labels.is_contiguous());
  const at::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(logits.scalar_type(), "linear_cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(lse.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    softmax_grad_rows_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), vocab, lse.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(),
        labels.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ftcore
