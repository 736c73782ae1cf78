// CUDA kernels of the rotation and quantization ops (contract in include/ftcore/quant.h).
//
// Row kernels: a block works on one row at a time (grid-stride over the rows). The row is read once (coalesced
// along the last dim) into a row buffer in the accumulation type, transformed there — the butterflies of H_P stage by stage, then the K×K mix into a second
// buffer — and written once, either as is (hadamard_transform) or fake-quantized group by group with block-wide
// reductions (rotate_fake_quantize, fake_quantize); the fused op also writes the straight-through mask, one bit
// an element (warp ballots), so its backward reads dy and the bits once, applies the transposed rotation and
// writes dx once.
//
// A row takes n (K = 1) or 2n (K > 1) accumulation values. They live in shared memory when they fit beside the
// kernel's static shared memory within the device's opt-in limit (float32 K > 1 up to n ≈ 29000 on an H100,
// ≈ 20800 on an A100; float64 half that); larger rows (Qwen2-72B's 29,568, Llama-3-70B's 28,672 on an A100) run
// the same code on a global-memory workspace, one row buffer per block of a grid of two blocks an SM (rotation_row_storage in
// include/ftcore/quant.h decides, row_launch below applies it). The opt-in attribute is set once per kernel and
// device, under a lock: setting it on every call raced between threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

#include "ftcore/checks.h"
#include "ftcore/dispatch.h"
#include "ftcore/quant.h"
#include "ftcore/shapes.h"

namespace ftcore {
namespace {

// Threads a row gets: about 8 elements each, 32 to 512.
int threads_for(int64_t n) {
  int t = 32;
  while (t < 512 && int64_t(t) * 8 < n) t *= 2;
  return t;
}

template <typename acc_t>
struct RotationArgs {
  int64_t n, k, p;
  const float* h;       // K×K, row-major, or null for K = 1
  const acc_t* signs;   // n, or null
  acc_t scale;
};

// Reduces v over the block (blockDim.x a multiple of 32); every thread gets the result. `scratch` holds 32.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < warps; ++w) v = op(v, scratch[w]);
  return v;
}

struct MinOp {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// (min, max) — or (unused, max |x|) when symmetric — of x[i · stride] for i in [begin, end), over the block.
template <typename V>
__device__ void block_range(const V* x, int64_t stride, int64_t begin, int64_t end, bool symmetric, float* scratch,
                            float& lo, float& hi) {
  lo = INFINITY, hi = symmetric ? 0.f : -INFINITY;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = static_cast<float>(x[i * stride]);
    if (symmetric) {
      hi = fmaxf(hi, fabsf(v));
    } else {
      lo = fminf(lo, v), hi = fmaxf(hi, v);
    }
  }
  hi = block_reduce(hi, MaxOp(), scratch);
  if (!symmetric) lo = block_reduce(lo, MinOp(), scratch);
}

// Rotates the row in buf (shared) in place or into tmp (shared, K > 1); returns where the result is.
// Ends with a barrier: the result is visible to the whole block.
template <typename acc_t>
__device__ acc_t* rotate_row(acc_t* buf, acc_t* tmp, const RotationArgs<acc_t>& r, bool transpose) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if (!transpose && r.signs) {
    for (int64_t i = tid; i < r.n; i += nt) buf[i] *= r.signs[i];
    __syncthreads();
  }
  // Stage h pairs i and i + h within blocks of 2h; blocks never straddle the K segments (2h ≤ P divides P).
  for (int64_t h = 1; h < r.p; h <<= 1) {
    for (int64_t t = tid; t < r.n / 2; t += nt) {
      const int64_t i = (t / h) * 2 * h + (t % h);
      const acc_t a = buf[i], b = buf[i + h];
      buf[i] = a + b;
      buf[i + h] = a - b;
    }
    __syncthreads();
  }
  acc_t* out = buf;
  if (r.h) {
    for (int64_t e = tid; e < r.n; e += nt) {
      const int64_t a = e / r.p, b = e - a * r.p;
      acc_t acc = 0;
      for (int64_t c = 0; c < r.k; ++c)
        acc += static_cast<acc_t>(__ldg(r.h + (transpose ? c * r.k + a : a * r.k + c))) * buf[c * r.p + b];
      tmp[e] = acc;
    }
    out = tmp;
    __syncthreads();
  }
  for (int64_t i = tid; i < r.n; i += nt)
    out[i] *= (transpose && r.signs) ? r.signs[i] * r.scale : r.scale;
  __syncthreads();
  return out;
}

// Fake-quantizes one row's groups from v (shared or global, stride 1 or `stride`) into out; computes each
// group's parameters (block-wide reductions) unless `given` (then read at given_stride per group).
template <typename V, typename scalar_t>
__device__ void quantize_row(const V* v, int64_t stride, int64_t group_size, int64_t groups, QuantRange range,
                             bool symmetric, float clip, bool given, int64_t given_stride, float* scale, float* zero,
                             scalar_t* out, float* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t base = grp * group_size;
    float s, z;
    if (given) {
      s = scale[grp * given_stride], z = zero[grp * given_stride];
    } else {
      float lo, hi;
      block_range(v, stride, base, base + group_size, symmetric, scratch, lo, hi);
      quant_params(lo, hi, range, symmetric, clip, s, z);
      if (threadIdx.x == 0) scale[grp] = s, zero[grp] = z;
    }
    for (int64_t i = threadIdx.x; i < group_size; i += blockDim.x)
      out[base + i] = static_cast<scalar_t>(fake_quant(static_cast<acc_t>(v[(base + i) * stride]), s, z, range));
  }
}

template <typename scalar_t, typename acc_t>
__device__ void load_row(const scalar_t* x, int64_t stride, int64_t n, acc_t* buf) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) buf[i] = static_cast<acc_t>(x[i * stride]);
  __syncthreads();
}

// The row buffer of this block: dynamic shared memory, or this block's slice of the global workspace.
template <typename acc_t>
__device__ acc_t* row_buffer(unsigned char* smem, acc_t* workspace, int64_t width) {
  return workspace ? workspace + static_cast<int64_t>(blockIdx.x) * width : reinterpret_cast<acc_t*>(smem);
}

// Row kernels loop over rows (grid-stride): the shared path launches a block a row, the global path only as many
// blocks as have a workspace slice. Each row ends with a barrier, so the next row's load never overwrites a
// buffer another thread still reads.
template <typename scalar_t, typename acc_t>
__global__ void hadamard_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t rs, int64_t cs,
                                RotationArgs<acc_t> r, bool transpose, scalar_t* __restrict__ y,
                                acc_t* __restrict__ workspace, int64_t width) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* buf = row_buffer(smem, workspace, width);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    load_row(x + row * rs, cs, r.n, buf);
    const acc_t* out = rotate_row(buf, buf + r.n, r, transpose);
    for (int64_t i = threadIdx.x; i < r.n; i += blockDim.x) y[row * r.n + i] = static_cast<scalar_t>(out[i]);
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rotate_fake_quantize_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t rs, int64_t cs,
                                            RotationArgs<acc_t> r, int64_t group_size, QuantRange range,
                                            bool symmetric, float clip, float* __restrict__ scale,
                                            float* __restrict__ zero, scalar_t* __restrict__ y,
                                            uint8_t* __restrict__ mask, acc_t* __restrict__ workspace,
                                            int64_t width) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float scratch[32];
  acc_t* buf = row_buffer(smem, workspace, width);
  const int64_t groups = r.n / group_size, mask_bytes = (r.n + 7) / 8;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    load_row(x + row * rs, cs, r.n, buf);
    const acc_t* rotated = rotate_row(buf, buf + r.n, r, false);
    quantize_row(rotated, 1, group_size, groups, range, symmetric, clip, false, 1, scale + row * groups,
                 zero + row * groups, y + row * r.n, scratch);
    __syncthreads();  // the group parameters (written by thread 0) are visible to the block
    // The straight-through bits: a warp covers 32 consecutive elements (blockDim is a multiple of 32), so one
    // ballot is four bytes of the mask.
    const int64_t words = (r.n + 31) / 32;
    for (int64_t i = threadIdx.x; i < words * 32; i += blockDim.x) {
      bool inside = false;
      if (i < r.n) {
        const int64_t at = row * groups + i / group_size;
        inside = quant_inside(quant_level(rotated[i], scale[at], zero[at]), range);
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, inside);
      if ((threadIdx.x & 31) == 0)
        for (int64_t b = 0; b < 4 && i / 8 + b < mask_bytes; ++b)
          mask[row * mask_bytes + i / 8 + b] = static_cast<uint8_t>(ballot >> (8 * b));
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rotate_fake_quantize_backward_kernel(const scalar_t* __restrict__ dy, int64_t rows, int64_t gr,
                                                     int64_t gc, const uint8_t* __restrict__ mask,
                                                     RotationArgs<acc_t> r, scalar_t* __restrict__ dx,
                                                     acc_t* __restrict__ workspace, int64_t width) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* buf = row_buffer(smem, workspace, width);
  const int64_t mask_bytes = (r.n + 7) / 8;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    for (int64_t i = threadIdx.x; i < r.n; i += blockDim.x)
      buf[i] = ((mask[row * mask_bytes + (i >> 3)] >> (i & 7)) & 1) ? static_cast<acc_t>(dy[row * gr + i * gc])
                                                                    : acc_t(0);
    __syncthreads();
    const acc_t* out = rotate_row(buf, buf + r.n, r, true);
    for (int64_t i = threadIdx.x; i < r.n; i += blockDim.x) dx[row * r.n + i] = static_cast<scalar_t>(out[i]);
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void fake_quantize_kernel(const scalar_t* __restrict__ x, int64_t rs, int64_t cs, int64_t n,
                                     int64_t group_size, QuantRange range, bool symmetric, float clip, bool given,
                                     bool whole_tensor, float* __restrict__ scale, float* __restrict__ zero,
                                     scalar_t* __restrict__ y) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x, groups = n / group_size;
  const int64_t at = whole_tensor ? 0 : row * groups;
  quantize_row(x + row * rs, cs, group_size, groups, range, symmetric, clip, given, whole_tensor ? 0 : 1,
               scale + at, zero + at, y + row * n, scratch);
}

// The (1, 1) parameters of a whole tensor from its (min, max), on the device (no host synchronisation).
__global__ void whole_tensor_params_kernel(const float* lo, const float* hi, QuantRange range, bool symmetric,
                                           float clip, float* scale, float* zero) {
  const float h = symmetric ? fmaxf(fabsf(*lo), fabsf(*hi)) : *hi;
  quant_params(*lo, h, range, symmetric, clip, *scale, *zero);
}

template <typename scalar_t>
__global__ void fake_quantize_backward_kernel(const scalar_t* __restrict__ dy, int64_t gr, int64_t gc,
                                              const scalar_t* __restrict__ x, int64_t xr, int64_t xc, int64_t n,
                                              int64_t group_size, QuantRange range, bool whole_tensor,
                                              const float* __restrict__ scale, const float* __restrict__ zero,
                                              scalar_t* __restrict__ dx, double* __restrict__ dscale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double scratch[32];
  const int64_t row = blockIdx.x, groups = n / group_size;
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t at = whole_tensor ? 0 : row * groups + grp;
    const float s = scale[at], z = zero[at];
    double acc = 0.0;
    for (int64_t i = grp * group_size + threadIdx.x; i < (grp + 1) * group_size; i += blockDim.x) {
      const acc_t v = static_cast<acc_t>(x[row * xr + i * xc]);
      const acc_t d = static_cast<acc_t>(dy[row * gr + i * gc]);
      const acc_t level = quant_level(v, s, z);
      const bool inside = quant_inside(level, range);
      dx[row * n + i] = static_cast<scalar_t>(inside ? d : acc_t(0));
      if (dscale)
        acc += static_cast<double>(d) * (inside ? static_cast<double>(level - z) - static_cast<double>(v) / s
                                                : static_cast<double>(quant_clamp(level, range) - z));
    }
    if (dscale) {
      acc = block_reduce(acc, SumOp(), scratch);
      if (threadIdx.x == 0) dscale[row * groups + grp] = acc;
    }
  }
}

template <typename scalar_t>
__global__ void quantize_int4_kernel(const scalar_t* __restrict__ w, int64_t rs, int64_t cs, int64_t n,
                                     int64_t group_size, bool symmetric, float clip, float* __restrict__ scale,
                                     uint8_t* __restrict__ zero, uint8_t* __restrict__ packed) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ float scratch[32];
  const QuantRange range = quant_range(4, symmetric);
  const float offset = symmetric ? 8.f : 0.f;
  const int64_t row = blockIdx.x, groups = n / group_size;
  const scalar_t* x = w + row * rs;
  // Parameters first (written to global memory; the barrier in block_reduce and the one below make them
  // visible to the block), then the codes two columns a thread.
  for (int64_t grp = 0; grp < groups; ++grp) {
    float lo, hi, s, z;
    block_range(x, cs, grp * group_size, (grp + 1) * group_size, symmetric, scratch, lo, hi);
    quant_params(lo, hi, range, symmetric, clip, s, z);
    if (threadIdx.x == 0) scale[row * groups + grp] = s, zero[row * groups + grp] = static_cast<uint8_t>(z + offset);
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n / 2; j += blockDim.x) {
    uint8_t byte = 0;
    for (int half = 0; half < 2; ++half) {
      const int64_t c = 2 * j + half, at = row * groups + c / group_size;
      const float s = scale[at], z = static_cast<float>(zero[at]) - offset;
      const acc_t level = quant_clamp(quant_level(static_cast<acc_t>(x[c * cs]), s, z), range);
      byte |= static_cast<uint8_t>(static_cast<int>(level + offset) << (4 * half));
    }
    packed[row * (n / 2) + j] = byte;
  }
}

__global__ void pack_int4_kernel(const uint8_t* __restrict__ codes, int64_t count, uint8_t* __restrict__ packed) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < count) packed[j] = static_cast<uint8_t>((codes[2 * j] & 0xF) | (codes[2 * j + 1] << 4));
}

__global__ void unpack_int4_kernel(const uint8_t* __restrict__ packed, int64_t count, uint8_t* __restrict__ codes) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= count) return;
  codes[2 * j] = packed[j] & 0xF;
  codes[2 * j + 1] = packed[j] >> 4;
}

template <typename scalar_t>
__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                       const uint8_t* __restrict__ zero, int64_t in, int64_t group_size,
                                       int64_t total, scalar_t* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t r = e / in, c = e - r * in;
  const uint8_t code = (packed[r * (in / 2) + c / 2] >> (4 * (c & 1))) & 0xF;
  const int64_t at = r * (in / group_size) + c / group_size;
  out[e] = static_cast<scalar_t>((static_cast<float>(code) - static_cast<float>(zero[at])) * scale[at]);
}

constexpr int kThreads = 256;
inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// A row kernel's static shared memory on the current device, read once per kernel and device; its dynamic limit
// is raised to all the opt-in memory left beside it at the same time, so no later launch sets an attribute.
int64_t row_kernel_static_smem(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> known;
  int device;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find({kernel, device});
  if (it != known.end()) return it->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const int64_t room = optin - static_cast<int64_t>(attr.sharedSizeBytes);
  if (room > attr.maxDynamicSharedSizeBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(room)));
  known.emplace(std::make_pair(kernel, device), static_cast<int64_t>(attr.sharedSizeBytes));
  return attr.sharedSizeBytes;
}

// How a row kernel is launched for `rows` rows of n values: grid, dynamic shared memory, and the global workspace
// (empty on the shared path).
template <typename acc_t>
struct RowLaunch {
  unsigned grid;
  size_t smem;
  int64_t width;  // accumulation values a row buffer holds
  at::Tensor workspace;
  acc_t* workspace_ptr() { return workspace.defined() ? workspace.data_ptr<acc_t>() : nullptr; }
};

template <typename acc_t>
RowLaunch<acc_t> row_launch(const void* kernel, int64_t rows, int64_t n, int64_t k, const at::Tensor& like) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t width = rotation_row_bytes(n, k, 1);
  const auto where = rotation_row_storage(n, k, sizeof(acc_t), row_kernel_static_smem(kernel),
                                          prop->sharedMemPerBlockOptin);
  constexpr int64_t kMaxGrid = 1 << 30;  // rows past it are covered by the grid-stride loop
  if (where == RowStorage::Shared)
    return {static_cast<unsigned>(std::min(rows, kMaxGrid)), static_cast<size_t>(width) * sizeof(acc_t), width, {}};
  // Two blocks an SM keep the workspace (a row buffer a block) a few times the L2, not rows times the row.
  const int64_t grid = std::min<int64_t>(rows, 2 * prop->multiProcessorCount);
  auto workspace = at::empty({grid, width}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  return {static_cast<unsigned>(grid), 0, width, workspace};
}

template <typename acc_t>
RotationArgs<acc_t> rotation_args(int64_t n, int64_t k, const std::optional<at::Tensor>& hadamard_k,
                                  const std::optional<at::Tensor>& signs, double scale, at::Tensor& h_keep,
                                  at::Tensor& s_keep) {
  RotationArgs<acc_t> r{n, k, n / k, nullptr, nullptr, static_cast<acc_t>(scale)};
  if (hadamard_k && k > 1) {
    h_keep = hadamard_k->contiguous();
    r.h = h_keep.data_ptr<float>();
  }
  if (signs) {
    s_keep = signs->to(sizeof(acc_t) == 8 ? at::kDouble : at::kFloat).contiguous();
    r.signs = s_keep.data_ptr<acc_t>();
  }
  return r;
}

}  // namespace

at::Tensor hadamard_transform_cuda(const at::Tensor& input, const std::optional<at::Tensor>& hadamard_k,
                                   const std::optional<at::Tensor>& signs, double scale, bool transpose) {
  constexpr const char* op = "hadamard_transform";
  const int64_t k = check_hadamard_args(input, hadamard_k, signs, op);
  const at::cuda::OptionalCUDAGuard guard(input.device());
  const int64_t n = input.size(-1);
  auto result = at::empty(input.sizes(), input.options());
  if (result.numel() == 0) return result;
  const auto x = as_rows(input);
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor h_keep, s_keep;
    const auto r = rotation_args<acc_t>(n, k, hadamard_k, signs, scale, h_keep, s_keep);
    const auto kernel = hadamard_kernel<scalar_t, acc_t>;
    auto launch = row_launch<acc_t>(reinterpret_cast<const void*>(kernel), x.size(0), n, k, input);
    kernel<<<launch.grid, threads_for(n), launch.smem, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), x.size(0), x.stride(0), x.stride(1), r, transpose, result.data_ptr<scalar_t>(),
        launch.workspace_ptr(), launch.width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_cuda(const at::Tensor& input,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   int64_t bits, bool symmetric, int64_t group_size,
                                                                   double clip_ratio) {
  constexpr const char* op = "fake_quantize";
  const at::cuda::OptionalCUDAGuard guard(input.device());
  FakeQuantSetup setup = setup_fake_quantize(input, scale, bits, symmetric, group_size, clip_ratio);
  const Grouping& g = setup.g;
  at::Tensor &qscale = setup.scale, &zero = setup.zero;
  const QuantRange range = quant_range(bits, symmetric);
  const float clip = static_cast<float>(clip_ratio);
  auto result = at::empty(input.sizes(), input.options());
  if (result.numel() == 0) return {result, qscale, zero};
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (!scale && g.whole_tensor) {
    const auto [mn, mx] = at::aminmax(input);
    const auto lo = mn.to(at::kFloat), hi = mx.to(at::kFloat);
    whole_tensor_params_kernel<<<1, 1, 0, stream>>>(lo.data_ptr<float>(), hi.data_ptr<float>(), range, symmetric,
                                                    clip, qscale.data_ptr<float>(), zero.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto x = as_rows(input);
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    fake_quantize_kernel<scalar_t><<<g.rows, threads_for(g.n), 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), g.n, g.group_size, range, symmetric, clip,
        scale.has_value() || g.whole_tensor, g.whole_tensor, qscale.data_ptr<float>(), zero.data_ptr<float>(),
        result.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {result, qscale, zero};
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                                                               const at::Tensor& scale, const at::Tensor& zero_point,
                                                               int64_t bits, bool symmetric, int64_t group_size,
                                                               bool scale_grad) {
  constexpr const char* op = "fake_quantize_backward";
  const Grouping g = check_quant_args(input, bits, group_size, 1.0, op);
  check_grad_like(grad, input, op);
  check_scale(scale, input, g, op);
  check_scale(zero_point, input, g, op, "zero_point");
  const at::cuda::OptionalCUDAGuard guard(input.device());
  auto grad_input = at::empty(input.sizes(), input.options());
  auto grad_scale = scale_grad ? at::zeros({g.rows, g.groups}, input.options().dtype(at::kDouble)) : at::Tensor();
  if (input.numel() > 0) {
    const auto x = as_rows(input), dy = as_rows(grad);
    const auto s_c = scale.contiguous(), z_c = zero_point.contiguous();
    FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
      fake_quantize_backward_kernel<scalar_t><<<g.rows, threads_for(g.n), 0, at::cuda::getCurrentCUDAStream()>>>(
          dy.data_ptr<scalar_t>(), dy.stride(0), dy.stride(1), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), g.n,
          g.group_size, quant_range(bits, symmetric), g.whole_tensor, s_c.data_ptr<float>(), z_c.data_ptr<float>(),
          grad_input.data_ptr<scalar_t>(), scale_grad ? grad_scale.data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!scale_grad) return {grad_input, at::empty({0}, input.options().dtype(at::kFloat))};
  auto reduced = g.whole_tensor ? grad_scale.sum().view({1, 1}) : grad_scale;
  return {grad_input, reduced.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rotate_fake_quantize_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& hadamard_k, const std::optional<at::Tensor>& signs,
    double scale, int64_t bits, bool symmetric, int64_t group_size, double clip_ratio) {
  constexpr const char* op = "rotate_fake_quantize";
  int64_t k;
  const Grouping g = check_rotate_quant_args(input, hadamard_k, signs, bits, group_size, clip_ratio, k);
  const at::cuda::OptionalCUDAGuard guard(input.device());
  auto fopts = input.options().dtype(at::kFloat);
  auto qscale = at::empty({g.rows, g.groups}, fopts), zero = at::empty({g.rows, g.groups}, fopts);
  auto mask = at::empty({g.rows, (g.n + 7) / 8}, input.options().dtype(at::kByte));
  auto result = at::empty(input.sizes(), input.options());
  if (result.numel() == 0) return {result, qscale, zero, mask};
  const auto x = as_rows(input);
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor h_keep, s_keep;
    const auto r = rotation_args<acc_t>(g.n, k, hadamard_k, signs, scale, h_keep, s_keep);
    const auto kernel = rotate_fake_quantize_kernel<scalar_t, acc_t>;
    auto launch = row_launch<acc_t>(reinterpret_cast<const void*>(kernel), g.rows, g.n, k, input);
    kernel<<<launch.grid, threads_for(g.n), launch.smem, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), g.rows, x.stride(0), x.stride(1), r, g.group_size, quant_range(bits, symmetric),
        symmetric, static_cast<float>(clip_ratio), qscale.data_ptr<float>(), zero.data_ptr<float>(),
        result.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), launch.workspace_ptr(), launch.width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {result, qscale, zero, mask};
}

at::Tensor rotate_fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& mask,
                                              const std::optional<at::Tensor>& hadamard_k,
                                              const std::optional<at::Tensor>& signs, double scale) {
  constexpr const char* op = "rotate_fake_quantize_backward";
  const int64_t k = check_hadamard_args(grad, hadamard_k, signs, op);
  check_mask(mask, grad, op);
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  const int64_t n = grad.size(-1);
  auto result = at::empty(grad.sizes(), grad.options());
  if (result.numel() == 0) return result;
  const auto dy = as_rows(grad);
  const auto m_c = mask.contiguous();
  FTCORE_DISPATCH_FLOATING(grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor h_keep, s_keep;
    const auto r = rotation_args<acc_t>(n, k, hadamard_k, signs, scale, h_keep, s_keep);
    const auto kernel = rotate_fake_quantize_backward_kernel<scalar_t, acc_t>;
    auto launch = row_launch<acc_t>(reinterpret_cast<const void*>(kernel), dy.size(0), n, k, grad);
    kernel<<<launch.grid, threads_for(n), launch.smem, at::cuda::getCurrentCUDAStream()>>>(
        dy.data_ptr<scalar_t>(), dy.size(0), dy.stride(0), dy.stride(1), m_c.data_ptr<uint8_t>(), r,
        result.data_ptr<scalar_t>(), launch.workspace_ptr(), launch.width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cuda(const at::Tensor& weight, int64_t group_size,
                                                                  bool symmetric, double clip_ratio) {
  constexpr const char* op = "quantize_int4";
  const Grouping g = check_quantize_int4_args(weight, group_size, clip_ratio);
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  auto packed = at::empty({g.rows, g.n / 2}, weight.options().dtype(at::kByte));
  auto scale = at::empty({g.rows, g.groups}, weight.options().dtype(at::kFloat));
  auto zero = at::empty({g.rows, g.groups}, weight.options().dtype(at::kByte));
  if (weight.numel() == 0) return {packed, scale, zero};
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    quantize_int4_kernel<scalar_t><<<g.rows, threads_for(g.n), 0, at::cuda::getCurrentCUDAStream()>>>(
        weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1), g.n, g.group_size, symmetric,
        static_cast<float>(clip_ratio), scale.data_ptr<float>(), zero.data_ptr<uint8_t>(),
        packed.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, scale, zero};
}

// Codes above 15 are checked by ftcore.ops.pack_int4 (one host sync); the kernel keeps the low nibble only.
at::Tensor pack_int4_cuda(const at::Tensor& codes) {
  const auto sizes = check_pack_int4_args(codes);
  const at::cuda::OptionalCUDAGuard guard(codes.device());
  const auto c = codes.contiguous();
  auto out = at::empty(sizes, c.options());
  if (out.numel() == 0) return out;
  pack_int4_kernel<<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<uint8_t>(), out.numel(), out.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed) {
  const auto sizes = check_unpack_int4_args(packed);
  const at::cuda::OptionalCUDAGuard guard(packed.device());
  const auto p = packed.contiguous();
  auto out = at::empty(sizes, p.options());
  if (p.numel() == 0) return out;
  unpack_int4_kernel<<<blocks_for(p.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<uint8_t>(), p.numel(), out.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero_point,
                                int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_int4";
  const int64_t g = check_int4_args(packed, scale, zero_point, group_size, op);
  const at::cuda::OptionalCUDAGuard guard(packed.device());
  auto result = at::empty({packed.size(0), 2 * packed.size(1)}, packed.options().dtype(dtype));
  check_floating(result, op, "dtype");
  if (result.numel() == 0) return result;
  const auto p = packed.contiguous(), s = scale.contiguous(), z = zero_point.contiguous();
  FTCORE_DISPATCH_FLOATING(dtype, op, [&] {
    dequantize_int4_kernel<scalar_t><<<blocks_for(result.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<uint8_t>(), result.size(1), g, result.numel(),
        result.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

TORCH_LIBRARY_IMPL(ftcore, CUDA, m) {
  m.impl("hadamard_transform", &hadamard_transform_cuda);
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
  m.impl("rotate_fake_quantize", &rotate_fake_quantize_cuda);
  m.impl("rotate_fake_quantize_backward", &rotate_fake_quantize_backward_cuda);
  m.impl("quantize_int4", &quantize_int4_cuda);
  m.impl("pack_int4", &pack_int4_cuda);
  m.impl("unpack_int4", &unpack_int4_cuda);
  m.impl("dequantize_int4", &dequantize_int4_cuda);
}

}  // namespace ftcore
