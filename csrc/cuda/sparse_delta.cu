// CUDA kernels of the sparse-delta ops (contract in include/ftcore/sparse_delta.h).
//
// As on the CPU, grad and the products run over the tokens in chunks: a chunk of each activation is
// transposed through shared memory into a panel (features × width, accumulation dtype), so that
//   grad:      one warp per entry t reads two panel rows, coalesced, with 16-byte loads (a dot product);
//   products:  one block per output group (row or column of Δ), threads over tokens, reading panel rows
//              coalesced and each entry's index/value as a warp-wide broadcast.
// Panels are the only workspace ((in + out) · width elements, never out × in). Every launch goes to the current
// stream under a device guard and is checked; nothing synchronises with the host. Indices out of range trip a
// device-side assert and are never dereferenced; so do unsorted indices where order matters (products, scatter).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ftcore/checks.h"
#include "ftcore/dispatch.h"
#include "ftcore/shapes.h"
#include "ftcore/sparse_delta.h"

namespace ftcore {
namespace {

constexpr int kTile = 32;       // transpose tile edge
constexpr int kTileRows = 8;    // threads per tile column
constexpr int kThreads = 256;   // 1-D kernels
constexpr int kWarp = 32;
constexpr int64_t kAlign = 32;  // panel width granularity (keeps rows 16-byte aligned for every acc type)

inline int64_t blocks_for(int64_t n, int64_t per_block) { return (n + per_block - 1) / per_block; }

// Tokens per chunk: panels of all `features` within about 16 MB, at most 1024 tokens, no wider than needed.
int64_t panel_width(int64_t tokens, int64_t features, int64_t acc_bytes) {
  constexpr int64_t kBudget = 16 << 20, kMax = 1024;
  int64_t w = kBudget / std::max<int64_t>(features * acc_bytes, 1);
  w = std::clamp<int64_t>(w / kAlign * kAlign, kAlign, kMax);
  return std::min(w, std::max<int64_t>((tokens + kAlign - 1) / kAlign * kAlign, kAlign));
}

// panel[f * width + n] = m[n0 + n, f] for f < features, n < count; zero for count <= n < width.
template <typename scalar_t, typename acc_t>
__global__ void load_panel_kernel(const scalar_t* __restrict__ m, int64_t row_stride, int64_t col_stride, int64_t n0,
                                  int64_t count, int64_t features, acc_t* __restrict__ panel, int64_t width) {
  __shared__ acc_t tile[kTile][kTile + 1];
  const int64_t f_base = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n_base = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int64_t n = n_base + dy, f = f_base + threadIdx.x;
    acc_t v = 0;
    if (n < count && f < features) v = static_cast<acc_t>(m[(n0 + n) * row_stride + f * col_stride]);
    tile[dy][threadIdx.x] = v;
  }
  __syncthreads();
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int64_t f = f_base + dy, n = n_base + threadIdx.x;
    if (f < features && n < width) panel[f * width + n] = tile[threadIdx.x][dy];
  }
}

// m[n0 + n, f] = panel[f * width + n] for f < features, n < count.
template <typename scalar_t, typename acc_t>
__global__ void store_panel_kernel(const acc_t* __restrict__ panel, int64_t width, int64_t count, int64_t features,
                                   scalar_t* __restrict__ m, int64_t row_stride, int64_t col_stride, int64_t n0) {
  __shared__ acc_t tile[kTile][kTile + 1];
  const int64_t f_base = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n_base = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int64_t f = f_base + dy, n = n_base + threadIdx.x;
    if (f < features && n < count) tile[dy][threadIdx.x] = panel[f * width + n];
  }
  __syncthreads();
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int64_t n = n_base + dy, f = f_base + threadIdx.x;
    if (n < count && f < features) m[(n0 + n) * row_stride + f * col_stride] = static_cast<scalar_t>(tile[threadIdx.x][dy]);
  }
}

template <typename scalar_t, typename acc_t>
void load_panel(const at::Tensor& rows, int64_t n0, int64_t count, acc_t* panel, int64_t width, cudaStream_t stream) {
  const int64_t features = rows.size(1);
  if (features == 0) return;
  const dim3 grid(blocks_for(features, kTile), blocks_for(width, kTile)), block(kTile, kTileRows);
  load_panel_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(rows.data_ptr<scalar_t>(), rows.stride(0),
                                                                  rows.stride(1), n0, count, features, panel, width);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte vectors of the accumulation type.
template <typename acc_t>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  static constexpr int n = 4;
  __device__ static float dot(const float4& a, const float4& b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
};
template <>
struct Vec16<double> {
  using type = double2;
  static constexpr int n = 2;
  __device__ static double dot(const double2& a, const double2& b) { return a.x * b.x + a.y * b.y; }
};

// Splits a flat index, or returns false (after a device-side assert) when it is out of range.
template <typename index_t>
__device__ __forceinline__ bool split_index(index_t flat, int64_t in, int64_t numel, int64_t& row, int64_t& col) {
  const int64_t v = static_cast<int64_t>(flat);
  const bool ok = v >= 0 && v < numel;
  CUDA_KERNEL_ASSERT(ok && "ftcore: sparse-delta index out of range");
  if (!ok) return false;
  row = v / in;
  col = v - row * in;
  return true;
}

// out[t] += <g_panel[row t], x_panel[col t]>: one warp per entry, lanes striding over the tokens with 16-byte
// loads (a warp reads 512 contiguous bytes of each panel row per step), then a shuffle reduction.
template <typename acc_t, typename index_t>
__global__ void dot_entries_kernel(const acc_t* __restrict__ g_panel, const acc_t* __restrict__ x_panel,
                                   int64_t width, const index_t* __restrict__ indices, int64_t k, int64_t in,
                                   int64_t numel, acc_t* __restrict__ out) {
  using V = Vec16<acc_t>;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= k) return;  // warp-uniform: every lane of a warp has the same t
  int64_t row, col;
  if (!split_index(indices[t], in, numel, row, col)) return;
  const auto* g = reinterpret_cast<const typename V::type*>(g_panel + row * width);
  const auto* x = reinterpret_cast<const typename V::type*>(x_panel + col * width);
  acc_t s = 0;
  for (int64_t i = lane; i < width / V::n; i += kWarp) s += V::dot(g[i], x[i]);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (lane == 0) out[t] += s;
}

// dst[g * width + n] = Σ over the entries t of group g of values[t] · src[operand(t) * width + n].
template <typename acc_t, typename index_t>
__global__ void group_sums_kernel(const acc_t* __restrict__ src, int64_t width, const int64_t* __restrict__ ptr,
                                  const int64_t* __restrict__ order, const index_t* __restrict__ indices,
                                  int64_t in, int64_t numel, bool by_row, const acc_t* __restrict__ values,
                                  acc_t* __restrict__ dst) {
  const int64_t g = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (n >= width) return;
  acc_t s = 0;
  for (int64_t p = ptr[g]; p < ptr[g + 1]; ++p) {
    const int64_t t = order ? order[p] : p;
    int64_t row, col;
    if (!split_index(indices[t], in, numel, row, col)) continue;
    CUDA_KERNEL_ASSERT((by_row ? row : col) == g && "ftcore: sparse-delta indices must be sorted");
    s += values[t] * src[(by_row ? col : row) * width + n];
  }
  dst[g * width + n] = s;
}

// ptr[g] = first position p with keys[p] >= g * scale, for g in [0, groups]; keys sorted.
template <typename key_t>
__global__ void lower_bounds_kernel(const key_t* __restrict__ keys, int64_t k, int64_t groups, int64_t scale,
                                    int64_t* __restrict__ ptr) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g > groups) return;
  const int64_t target = g * scale;
  int64_t lo = 0, hi = k;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(keys[mid]) < target) lo = mid + 1; else hi = mid;
  }
  // Every key must fall in some group: none below 0, none at or past groups * scale (else it is out of range).
  CUDA_KERNEL_ASSERT((g != 0 || lo == 0) && "ftcore: sparse-delta index out of range");
  CUDA_KERNEL_ASSERT((g != groups || lo == k) && "ftcore: sparse-delta index out of range");
  ptr[g] = lo;
}

template <typename key_t>
at::Tensor lower_bounds(const at::Tensor& keys, int64_t groups, int64_t scale, cudaStream_t stream) {
  auto ptr = at::empty({groups + 1}, keys.options().dtype(at::kLong));
  lower_bounds_kernel<key_t><<<blocks_for(groups + 1, kThreads), kThreads, 0, stream>>>(
      keys.data_ptr<key_t>(), keys.numel(), groups, scale, ptr.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

at::Tensor sparse_delta_grad_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices) {
  const auto a = check_grad_args(grad_output, input, indices);
  const at::cuda::OptionalCUDAGuard guard(input.device());
  const int64_t tokens = a.input.size(0), out = a.grad_output.size(1), in = a.input.size(1);
  const int64_t k = a.indices.numel();
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto result = at::zeros({k}, input.options().dtype(acc));
  if (k == 0 || tokens == 0) return result;
  const int64_t width = panel_width(tokens, in + out, at::elementSize(acc));
  auto x_panel = at::empty({in * width}, result.options());
  auto g_panel = at::empty({out * width}, result.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), "sparse_delta_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FTCORE_DISPATCH_INDEX(a.indices.scalar_type(), "sparse_delta_grad", [&] {
      for (int64_t n0 = 0; n0 < tokens; n0 += width) {
        const int64_t count = std::min(width, tokens - n0);
        load_panel<scalar_t, acc_t>(a.input, n0, count, x_panel.data_ptr<acc_t>(), width, stream);
        load_panel<scalar_t, acc_t>(a.grad_output, n0, count, g_panel.data_ptr<acc_t>(), width, stream);
        dot_entries_kernel<acc_t, index_t><<<blocks_for(k, kThreads / kWarp), kThreads, 0, stream>>>(
            g_panel.data_ptr<acc_t>(), x_panel.data_ptr<acc_t>(), width, a.indices.data_ptr<index_t>(), k, in,
            out * in, result.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return result;
}

namespace {

at::Tensor product_cuda(const ProductArgs& a, const at::Tensor& original_input, bool transpose) {
  const at::cuda::OptionalCUDAGuard guard(original_input.device());
  const int64_t tokens = a.input.size(0), operand_features = a.input.size(1), groups = a.result_features;
  auto result = at::empty(with_last_dim(original_input, groups), original_input.options());
  if (result.numel() == 0) return result;
  if (a.indices.numel() == 0) return result.zero_();
  auto result_rows = as_rows(result);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t in = a.in_features, numel = a.out_features * a.in_features;

  // Entries of each group: rows are contiguous runs of the sorted indices; columns need a stable sort.
  at::Tensor ptr, order;
  FTCORE_DISPATCH_INDEX(a.indices.scalar_type(), "sparse_delta_groups", [&] {
    if (transpose) {
      auto [sorted_cols, perm] = at::sort(at::remainder(a.indices.to(at::kLong), in), /*stable=*/true, 0, false);
      ptr = lower_bounds<int64_t>(sorted_cols, groups, 1, stream);
      order = perm;
    } else {
      ptr = lower_bounds<index_t>(a.indices, groups, in, stream);
    }
  });

  const int64_t width = panel_width(tokens, operand_features + groups, a.values.element_size());
  auto src_panel = at::empty({operand_features * width}, a.values.options());
  auto dst_panel = at::empty({groups * width}, a.values.options());
  FTCORE_DISPATCH_FLOATING(original_input.scalar_type(), "sparse_delta_product", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FTCORE_DISPATCH_INDEX(a.indices.scalar_type(), "sparse_delta_product", [&] {
      for (int64_t n0 = 0; n0 < tokens; n0 += width) {
        const int64_t count = std::min(width, tokens - n0);
        load_panel<scalar_t, acc_t>(a.input, n0, count, src_panel.data_ptr<acc_t>(), width, stream);
        constexpr int kGroupThreads = 128;
        const dim3 grid(groups, blocks_for(width, kGroupThreads));
        group_sums_kernel<acc_t, index_t><<<grid, kGroupThreads, 0, stream>>>(
            src_panel.data_ptr<acc_t>(), width, ptr.data_ptr<int64_t>(),
            order.defined() ? order.data_ptr<int64_t>() : nullptr, a.indices.data_ptr<index_t>(), in, numel,
            !transpose, a.values.data_ptr<acc_t>(), dst_panel.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 sgrid(blocks_for(groups, kTile), blocks_for(count, kTile)), sblock(kTile, kTileRows);
        store_panel_kernel<scalar_t, acc_t><<<sgrid, sblock, 0, stream>>>(
            dst_panel.data_ptr<acc_t>(), width, count, groups, result_rows.data_ptr<scalar_t>(),
            result_rows.stride(0), result_rows.stride(1), n0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return result;
}

}  // namespace

at::Tensor sparse_delta_linear_cuda(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
                                    int64_t out_features) {
  return product_cuda(check_product_args(input, indices, values, out_features, /*transpose=*/false), input, false);
}

at::Tensor sparse_delta_linear_transpose_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                              const at::Tensor& values, int64_t in_features) {
  return product_cuda(check_product_args(grad_output, indices, values, in_features, /*transpose=*/true), grad_output,
                      true);
}

// ---------------------------------------------------------------------------------------------------------------

namespace {

// The first entry of each run of equal indices sums the run and writes the position once.
// `values` null: restore, i.e. write the start value exactly.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void scatter_kernel(scalar_t* __restrict__ w, int64_t in, int64_t numel, int64_t s0, int64_t s1,
                               const index_t* __restrict__ indices, const acc_t* __restrict__ values,
                               const scalar_t* __restrict__ base, acc_t alpha, int64_t k) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= k) return;
  const index_t i = indices[t];
  CUDA_KERNEL_ASSERT((t == 0 || indices[t - 1] <= i) && "ftcore: sparse-delta indices must be sorted");
  if (t > 0 && indices[t - 1] == i) return;
  int64_t row, col;
  if (!split_index(i, in, numel, row, col)) return;
  const int64_t off = row * s0 + col * s1;
  const acc_t start = base ? static_cast<acc_t>(base[t]) : static_cast<acc_t>(w[off]);
  if (values == nullptr) {
    w[off] = static_cast<scalar_t>(start);
    return;
  }
  acc_t sum = 0;
  for (int64_t r = t; r < k && indices[r] == i; ++r) sum += values[r];
  w[off] = static_cast<scalar_t>(start + alpha * sum);
}

template <typename scalar_t, typename index_t>
__global__ void gather_kernel(const scalar_t* __restrict__ w, int64_t in, int64_t numel, int64_t s0, int64_t s1,
                              const index_t* __restrict__ indices, int64_t k, scalar_t* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= k) return;
  int64_t row, col;
  if (!split_index(indices[t], in, numel, row, col)) return;
  out[t] = w[row * s0 + col * s1];
}

}  // namespace

void sparse_delta_scatter_cuda(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha,
                               const std::optional<at::Tensor>& base) {
  check_scatter_args(weight, indices, values, base);
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  const int64_t k = indices.numel();
  if (k == 0) return;
  const auto idx = indices.contiguous();
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool restore = alpha == 0.0;  // leave the start value exactly; values are not read
  const auto vals = restore ? at::Tensor() : values.to(acc).contiguous();
  const auto base_c = base ? base->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), "sparse_delta_scatter_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), "sparse_delta_scatter_", [&] {
      scatter_kernel<scalar_t, acc_t, index_t><<<blocks_for(k, kThreads), kThreads, 0, stream>>>(
          weight.data_ptr<scalar_t>(), weight.size(1), weight.numel(), weight.stride(0), weight.stride(1),
          idx.data_ptr<index_t>(), restore ? nullptr : vals.data_ptr<acc_t>(),
          base ? base_c.data_ptr<scalar_t>() : nullptr,
          static_cast<acc_t>(alpha), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor sparse_delta_gather_cuda(const at::Tensor& weight, const at::Tensor& indices) {
  check_weight_args(weight, indices, "sparse_delta_gather");
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  const auto idx = indices.contiguous();
  const int64_t k = idx.numel();
  auto result = at::empty({k}, weight.options());
  if (k == 0) return result;
  const auto stream = at::cuda::getCurrentCUDAStream();
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), "sparse_delta_gather", [&] {
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), "sparse_delta_gather", [&] {
      gather_kernel<scalar_t, index_t><<<blocks_for(k, kThreads), kThreads, 0, stream>>>(
          weight.data_ptr<scalar_t>(), weight.size(1), weight.numel(), weight.stride(0), weight.stride(1),
          idx.data_ptr<index_t>(), k, result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

TORCH_LIBRARY_IMPL(ftcore, CUDA, m) {
  m.impl("sparse_delta_grad", &sparse_delta_grad_cuda);
  m.impl("sparse_delta_linear", &sparse_delta_linear_cuda);
  m.impl("sparse_delta_linear_transpose", &sparse_delta_linear_transpose_cuda);
  m.impl("sparse_delta_scatter_", &sparse_delta_scatter_cuda);
  m.impl("sparse_delta_gather", &sparse_delta_gather_cuda);
}

}  // namespace ftcore
