// Rotations and low-bit quantizers: the contract shared by the CPU and CUDA kernels (and by ftcore/reference.py).
//
// ---- Hadamard transform ---------------------------------------------------------------------------------------
// Along the last dim of length n = K·P, P = 2^m, with H = H_K ⊗ H_P: H_P the Sylvester matrix, H_K a K×K ±1
// matrix given as a float32 tensor (`hadamard_k`, absent when K = 1). Element i of a row is (a, b) with
// i = a·P + b, so a row is a K×P matrix V and H·v = H_K · V · H_P: a fast transform along each of the K
// segments, then a K×K mix across them. With the ±1 diagonal s (`signs`, optional) and `scale`:
//   forward:    y = scale · H · diag(s) · x
//   transposed: y = scale · diag(s) · Hᵀ · x           (the adjoint: the backward of forward, and vice versa)
// H·Hᵀ = n·I, so scale = 1/√n makes both orthonormal and each other's inverse. Accumulation is in float32
// (float64 for float64 data); every row is read once and written once.
//
// ---- fake quantization ----------------------------------------------------------------------------------------
// Elements are grouped along the last dim: group_size > 0 groups consecutive elements of a row (it divides n);
// group_size = 0 makes each row one group (an activation's token, a weight's output channel); group_size = -1
// makes the whole tensor one group. Scales and zero points are float32 tensors of shape (rows, groups), (1, 1)
// for the whole tensor. For b bits and clip ratio c (0 < c ≤ 1):
//   symmetric:  qmin = -2^(b-1), qmax = 2^(b-1) - 1, scale = c·max|x| / qmax,                        zero = 0
//   asymmetric: qmin = 0,        qmax = 2^b - 1,     scale = c·(max(x, 0) - min(x, 0)) / qmax,
//               zero = clamp(round(-c·min(x, 0) / scale), 0, qmax)
//   q = clamp(round(x / scale) + zero, qmin, qmax),  x̂ = (q - zero) · scale    (round half to even; scale = 1
//   where the group is all zero)
// Straight-through estimator: dx = dx̂ where qmin ≤ round(x / scale) + zero ≤ qmax, else 0. With a given
// (learnable, symmetric) scale the LSQ gradient is dscale = Σ dx̂ · (inside ? q - x/scale : q) over the group.
//
// The fused rotate + fake-quantize saves the straight-through mask of the rotated input as bits: uint8
// (rows, ceil(n/8)), bit b of byte j for element 8j + b, 1 where the element quantized inside the range.
//
// ---- int4 storage (the one place the layout is defined) --------------------------------------------------------
// A weight (out, in), in even, is stored as uint8 (out, in/2): byte j of a row holds the codes of columns 2j
// (low nibble) and 2j+1 (high nibble). A code u ∈ [0, 15] stands for (u - zero) · scale, with float32 scale and
// uint8 zero per (row, group) of group_size columns (group_size = 0: the whole row). Symmetric weights have
// zero = 8, so the code is the signed value plus 8; asymmetric ones use the zero point above. Quantizing to int4
// rounds exactly as fake quantization at 4 bits does, so an exported layer reproduces its fake-quant layer.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FTCORE_HD __host__ __device__ __forceinline__
#else
#define FTCORE_HD inline
#endif

namespace ftcore {

struct QuantRange {
  float qmin, qmax;
};

FTCORE_HD QuantRange quant_range(int64_t bits, bool symmetric) {
  if (symmetric) return {-static_cast<float>(1LL << (bits - 1)), static_cast<float>((1LL << (bits - 1)) - 1)};
  return {0.f, static_cast<float>((1LL << bits) - 1)};
}

// Scale and zero point of a group from its statistics: lo = min(x), hi = max(x) (asymmetric) or hi = max|x|
// (symmetric, lo unused).
FTCORE_HD void quant_params(float lo, float hi, QuantRange r, bool symmetric, float clip_ratio, float& scale,
                            float& zero) {
  if (symmetric) {
    scale = clip_ratio * hi / r.qmax;
    zero = 0.f;
  } else {
    lo = clip_ratio * fminf(lo, 0.f);
    hi = clip_ratio * fmaxf(hi, 0.f);
    scale = (hi - lo) / r.qmax;
    zero = scale > 0.f ? fminf(fmaxf(rintf(-lo / scale), 0.f), r.qmax) : 0.f;
  }
  if (!(scale > 0.f && scale < INFINITY)) scale = 1.f;  // all-zero group (NaN / inf data propagate below)
}

// The unclamped integer of x: round(x / scale) + zero, in the accumulation type.
template <typename acc_t>
FTCORE_HD acc_t quant_level(acc_t x, float scale, float zero) {
  const acc_t v = x / static_cast<acc_t>(scale);
  if constexpr (sizeof(acc_t) == 8) {
    return rint(v) + zero;
  } else {
    return rintf(v) + zero;
  }
}

FTCORE_HD bool quant_inside(double level, QuantRange r) { return level >= r.qmin && level <= r.qmax; }

template <typename acc_t>
FTCORE_HD acc_t quant_clamp(acc_t level, QuantRange r) {
  return level < r.qmin ? static_cast<acc_t>(r.qmin) : (level > r.qmax ? static_cast<acc_t>(r.qmax) : level);
}

template <typename acc_t>
FTCORE_HD acc_t fake_quant(acc_t x, float scale, float zero, QuantRange r) {
  return (quant_clamp(quant_level(x, scale, zero), r) - zero) * static_cast<acc_t>(scale);
}

}  // namespace ftcore

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace ftcore {

// The shapes the quantizers use, checked once (both devices): data viewed as (rows, n) and its grouping.
struct Grouping {
  int64_t rows, n, group_size, groups;  // group_size resolved: elements per group along a row (n for per-row)
  bool whole_tensor;
};
Grouping check_quant_args(const at::Tensor& x, int64_t bits, int64_t group_size, double clip_ratio, const char* op,
                          const char* name = "input");

// A scale passed in (learnable) or saved: float32, contiguous (rows, groups), or (1, 1) for the whole tensor.
void check_scale(const at::Tensor& scale, const at::Tensor& like, const Grouping& g, const char* op,
                 const char* name = "scale");

// hadamard_k (K×K float32 on x's device, K·P = n with P a power of two) and signs (n ±1 values, any float dtype
// on x's device). Returns K (1 without hadamard_k).
int64_t check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& hadamard_k,
                            const std::optional<at::Tensor>& signs, const char* op);

// fake_quantize's checked arguments and outputs before any arithmetic: the grouping, the scale tensor (a clone
// of a given, learnable scale — symmetric only — or uninitialised) and zero points (zeros), (rows, groups) or
// (1, 1) for the whole tensor.
struct FakeQuantSetup {
  Grouping g;
  at::Tensor scale, zero;
};
FakeQuantSetup setup_fake_quantize(const at::Tensor& input, const std::optional<at::Tensor>& scale, int64_t bits,
                                   bool symmetric, int64_t group_size, double clip_ratio);

// grad: floating, the dtype, device and shape of input (the backward ops).
void check_grad_like(const at::Tensor& grad, const at::Tensor& input, const char* op);

// rotate_fake_quantize: the rotation's arguments and a per-token or per-group grouping. Returns the grouping and
// sets k to the transform's K.
Grouping check_rotate_quant_args(const at::Tensor& input, const std::optional<at::Tensor>& hadamard_k,
                                 const std::optional<at::Tensor>& signs, int64_t bits, int64_t group_size,
                                 double clip_ratio, int64_t& k);

// quantize_int4: a floating 2-D weight with an even in_features, grouped per channel or per group.
Grouping check_quantize_int4_args(const at::Tensor& weight, int64_t group_size, double clip_ratio);

// pack_int4 codes (uint8, even last dim) / unpack_int4 packed bytes (uint8): the output shape.
std::vector<int64_t> check_pack_int4_args(const at::Tensor& codes);
std::vector<int64_t> check_unpack_int4_args(const at::Tensor& packed);

// The STE mask of rotate_fake_quantize: uint8 (rows, ceil(n / 8)) on grad's device, for grad (..., n).
void check_mask(const at::Tensor& mask, const at::Tensor& grad, const char* op);

// An int4 weight as stored: packed uint8 (out, in/2), scale float32 (out, groups), zero uint8 (out, groups).
// Returns the group size in columns.
int64_t check_int4_args(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                        int64_t group_size, const char* op);

// Where a CUDA rotation row kernel keeps the row it transforms: n accumulation values (2n when k > 1: the K×K
// mix needs a second buffer) of acc_bytes each. Shared memory when they fit beside the kernel's own static
// shared memory within the device's opt-in per-block limit; otherwise a global-memory workspace (every size
// works, at global-memory speed). A pure function of the numbers so the choice can be tested without a GPU.
enum class RowStorage { Shared, Global };
int64_t rotation_row_bytes(int64_t n, int64_t k, int64_t acc_bytes);
RowStorage rotation_row_storage(int64_t n, int64_t k, int64_t acc_bytes, int64_t static_smem_bytes,
                                int64_t optin_smem_bytes);

// out (m, rows) float32 = x (m, in) · dequant(W)ᵀ on the CPU without forming the dequantized weight: the decode
// path of int4_linear (checked arguments, group_size in columns).
void int4_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const at::Tensor& zero_point, int64_t group_size, at::Tensor& out);

}  // namespace ftcore
