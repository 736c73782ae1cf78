// CPU kernels of the rotation and quantization ops (contract in include/ftcore/quant.h).
//
// Every op walks rows in parallel; a row is read once into a per-thread buffer in the accumulation type,
// transformed there (the butterflies and the K×K mix run in the instruction-set builds of cpu/isa/), and
// written once. The fused rotate + fake-quantize keeps the rotated row in that buffer for its group statistics
// and rounding, so the rotated activation never goes to memory, and saves one bit an element for backward,
// which is then a single transposed rotation of the masked gradient.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/isa/kernels.h"
#include "ftcore/checks.h"
#include "ftcore/dispatch.h"
#include "ftcore/quant.h"
#include "ftcore/shapes.h"

namespace ftcore {

namespace {

// Rows handed to a thread at a time: enough elements to amortise the parallel region.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename acc_t>
constexpr cpu::Elem elem_of() {
  return sizeof(acc_t) == 8 ? cpu::Elem::Double : cpu::Elem::Float;
}

// One rotation's parameters, its small tensors made contiguous in the accumulation type once per call.
template <typename acc_t>
struct Rotation {
  int64_t n, k, p;
  at::Tensor h, signs;  // kept alive for the raw pointers below
  const float* h_ptr = nullptr;
  const acc_t* signs_ptr = nullptr;
  acc_t scale;

  Rotation(int64_t n_, int64_t k_, const std::optional<at::Tensor>& hadamard_k,
           const std::optional<at::Tensor>& signs_, double scale_)
      : n(n_), k(k_), p(n_ / k_), scale(static_cast<acc_t>(scale_)) {
    if (hadamard_k && k > 1) {
      h = hadamard_k->contiguous();
      h_ptr = h.data_ptr<float>();
    }
    if (signs_) {
      signs = signs_->to(sizeof(acc_t) == 8 ? at::kDouble : at::kFloat).contiguous();
      signs_ptr = signs.template data_ptr<acc_t>();
    }
  }

  // Rotates the row in `buf` (n values; `tmp` is n more of scratch): forward y = scale·H·diag(s)·x, transposed
  // y = scale·diag(s)·Hᵀ·x. Returns where the result is (buf or tmp).
  acc_t* apply(acc_t* buf, acc_t* tmp, bool transpose) const {
    const auto& kern = cpu::active_kernels();
    if (!transpose && signs_ptr)
      for (int64_t i = 0; i < n; ++i) buf[i] *= signs_ptr[i];
    kern.fwht(elem_of<acc_t>(), buf, p, k);
    acc_t* out = buf;
    if (h_ptr) {
      kern.hadamard_mix(elem_of<acc_t>(), h_ptr, k, transpose, buf, p, tmp);
      out = tmp;
    }
    if (transpose && signs_ptr) {
      for (int64_t i = 0; i < n; ++i) out[i] *= signs_ptr[i] * scale;
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] *= scale;
    }
    return out;
  }
};

template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* x, int64_t stride, int64_t n, acc_t* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i * stride]);
}

// Statistics of a group for quant_params: (min, max), or (unused, max |x|) when symmetric.
template <typename T>
void group_stats(const T* x, int64_t stride, int64_t len, bool symmetric, float& lo, float& hi) {
  float a = INFINITY, b = -INFINITY;
  if (symmetric) {
    b = 0.f;
    for (int64_t i = 0; i < len; ++i) b = std::max(b, std::abs(static_cast<float>(x[i * stride])));
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const float v = static_cast<float>(x[i * stride]);
      a = std::min(a, v);
      b = std::max(b, v);
    }
  }
  lo = a, hi = b;
}

// Fake-quantizes the groups of one row in place (n values in the accumulation type); computes each group's scale
// and zero point unless `given` (then read from scale/zero at `given_stride` per group, 0 for one shared pair).
// With `bits` (the row's packed mask), records which elements quantized inside the range.
template <typename acc_t>
void quantize_row(acc_t* v, const Grouping& g, QuantRange range, bool symmetric, float clip, bool given,
                  int64_t given_stride, float* scale, float* zero, uint8_t* bits = nullptr) {
  const auto& kern = cpu::active_kernels();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    acc_t* x = v + grp * g.group_size;
    float s, z;
    if (given) {
      s = scale[grp * given_stride], z = zero[grp * given_stride];
    } else {
      float lo = 0.f, hi = 0.f;
      kern.group_range(elem_of<acc_t>(), x, g.group_size, symmetric, &lo, &hi);
      quant_params(lo, hi, range, symmetric, clip, s, z);
      scale[grp] = s, zero[grp] = z;
    }
    kern.fake_quant(elem_of<acc_t>(), x, g.group_size, s, z, range.qmin, range.qmax, bits, grp * g.group_size);
  }
}

// Zeroes the gradient row gbuf where the row v (both n values in the accumulation type) quantizes outside the
// range: the straight-through mask, group by group.
template <typename acc_t>
void mask_row(const acc_t* v, acc_t* gbuf, const Grouping& g, QuantRange range, const float* scale,
              const float* zero, int64_t param_stride) {
  const auto& kern = cpu::active_kernels();
  for (int64_t grp = 0; grp < g.groups; ++grp)
    kern.ste_mask(elem_of<acc_t>(), v + grp * g.group_size, g.group_size, scale[grp * param_stride],
                  zero[grp * param_stride], range.qmin, range.qmax, gbuf + grp * g.group_size);
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* v, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(v[i]);
}

// Scale and zero point of the whole tensor as a (1, 1) pair.
void whole_tensor_params(const at::Tensor& x, QuantRange range, bool symmetric, float clip, float& s, float& z) {
  const auto [mn, mx] = at::aminmax(x);
  const float lo = mn.item<float>(), hi = mx.item<float>();
  quant_params(lo, symmetric ? std::max(std::abs(lo), std::abs(hi)) : hi, range, symmetric, clip, s, z);
}

}  // namespace

at::Tensor hadamard_transform_cpu(const at::Tensor& input, const std::optional<at::Tensor>& hadamard_k,
                                  const std::optional<at::Tensor>& signs, double scale, bool transpose) {
  constexpr const char* op = "hadamard_transform";
  const int64_t k = check_hadamard_args(input, hadamard_k, signs, op);
  const int64_t n = input.size(-1);
  auto result = at::empty(input.sizes(), input.options());
  if (result.numel() == 0) return result;
  const auto x = as_rows(input);
  auto y = result.view({-1, n});
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rotation<acc_t> rot(n, k, hadamard_k, signs, scale);
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const int64_t rs = x.stride(0), cs = x.stride(1);
    at::parallel_for(0, x.size(0), row_grain(n), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(n), tmp(k > 1 ? n : 0);
      for (int64_t r = r0; r < r1; ++r) {
        load_row(src + r * rs, cs, n, buf.data());
        store_row(rot.apply(buf.data(), tmp.data(), transpose), n, dst + r * n);
      }
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_cpu(const at::Tensor& input,
                                                                  const std::optional<at::Tensor>& scale,
                                                                  int64_t bits, bool symmetric, int64_t group_size,
                                                                  double clip_ratio) {
  constexpr const char* op = "fake_quantize";
  FakeQuantSetup setup = setup_fake_quantize(input, scale, bits, symmetric, group_size, clip_ratio);
  const Grouping& g = setup.g;
  at::Tensor &qscale = setup.scale, &zero = setup.zero;
  const QuantRange range = quant_range(bits, symmetric);
  const float clip = static_cast<float>(clip_ratio);
  auto result = at::empty(input.sizes(), input.options());
  if (result.numel() == 0) return {result, qscale, zero};
  const bool given = scale.has_value() || g.whole_tensor;
  if (!scale && g.whole_tensor) {
    float s, z;
    whole_tensor_params(input, range, symmetric, clip, s, z);
    qscale.fill_(s), zero.fill_(z);
  }
  const auto x = as_rows(input);
  auto y = result.view({-1, g.n});
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    float* s = qscale.data_ptr<float>();
    float* z = zero.data_ptr<float>();
    const int64_t rs = x.stride(0), cs = x.stride(1);
    at::parallel_for(0, g.rows, row_grain(g.n), [&](int64_t r0, int64_t r1) {
      std::vector<at::opmath_type<scalar_t>> buf(g.n);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at_row = g.whole_tensor ? 0 : r * g.groups;
        load_row(src + r * rs, cs, g.n, buf.data());
        quantize_row(buf.data(), g, range, symmetric, clip, given, g.whole_tensor ? 0 : 1, s + at_row, z + at_row);
        store_row(buf.data(), g.n, dst + r * g.n);
      }
    });
  });
  return {result, qscale, zero};
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                              const at::Tensor& scale, const at::Tensor& zero_point,
                                                              int64_t bits, bool symmetric, int64_t group_size,
                                                              bool scale_grad) {
  constexpr const char* op = "fake_quantize_backward";
  const Grouping g = check_quant_args(input, bits, group_size, 1.0, op);
  check_grad_like(grad, input, op);
  check_scale(scale, input, g, op);
  check_scale(zero_point, input, g, op, "zero_point");
  const QuantRange range = quant_range(bits, symmetric);
  auto grad_input = at::empty(input.sizes(), input.options());
  // LSQ partial sums per (row, group); summed to (1, 1) below for a whole-tensor scale.
  auto grad_scale = scale_grad ? at::zeros({g.rows, g.groups}, input.options().dtype(at::kDouble)) : at::Tensor();
  if (input.numel() > 0) {
    const auto x = as_rows(input), dy = as_rows(grad);
    const auto s_c = scale.contiguous(), z_c = zero_point.contiguous();
    FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = dy.data_ptr<scalar_t>();
      scalar_t* out = grad_input.data_ptr<scalar_t>();
      const float* s = s_c.data_ptr<float>();
      const float* z = z_c.data_ptr<float>();
      double* gs = scale_grad ? grad_scale.data_ptr<double>() : nullptr;
      const int64_t xr = x.stride(0), xc = x.stride(1), gr = dy.stride(0), gc = dy.stride(1);
      if (!gs) {
        at::parallel_for(0, g.rows, row_grain(g.n), [&](int64_t r0, int64_t r1) {
          std::vector<acc_t> buf(g.n), gbuf(g.n);
          for (int64_t r = r0; r < r1; ++r) {
            load_row(xp + r * xr, xc, g.n, buf.data());
            load_row(gp + r * gr, gc, g.n, gbuf.data());
            const int64_t at_row = g.whole_tensor ? 0 : r * g.groups;
            mask_row(buf.data(), gbuf.data(), g, range, s + at_row, z + at_row, g.whole_tensor ? 0 : 1);
            store_row(gbuf.data(), g.n, out + r * g.n);
          }
        });
        return;
      }
      // With the LSQ scale gradient: element by element, the partial sums in float64.
      at::parallel_for(0, g.rows, row_grain(g.n), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            const int64_t at = g.whole_tensor ? 0 : r * g.groups + grp;
            const float sc = s[at], zp = z[at];
            double acc = 0.0;
            for (int64_t i = grp * g.group_size; i < (grp + 1) * g.group_size; ++i) {
              const acc_t v = static_cast<acc_t>(xp[r * xr + i * xc]);
              const acc_t d = static_cast<acc_t>(gp[r * gr + i * gc]);
              const acc_t level = quant_level(v, sc, zp);
              const bool inside = quant_inside(level, range);
              out[r * g.n + i] = static_cast<scalar_t>(inside ? d : acc_t(0));
              acc += static_cast<double>(d) * (inside ? static_cast<double>(level - zp) - static_cast<double>(v) / sc
                                                      : static_cast<double>(quant_clamp(level, range) - zp));
            }
            gs[r * g.groups + grp] = acc;
          }
      });
    });
  }
  if (!scale_grad) return {grad_input, at::empty({0}, input.options().dtype(at::kFloat))};
  auto reduced = g.whole_tensor ? grad_scale.sum().view({1, 1}) : grad_scale;
  return {grad_input, reduced.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rotate_fake_quantize_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& hadamard_k, const std::optional<at::Tensor>& signs,
    double scale, int64_t bits, bool symmetric, int64_t group_size, double clip_ratio) {
  constexpr const char* op = "rotate_fake_quantize";
  int64_t k;
  const Grouping g = check_rotate_quant_args(input, hadamard_k, signs, bits, group_size, clip_ratio, k);
  const QuantRange range = quant_range(bits, symmetric);
  const float clip = static_cast<float>(clip_ratio);
  auto fopts = input.options().dtype(at::kFloat);
  auto qscale = at::empty({g.rows, g.groups}, fopts), zero = at::empty({g.rows, g.groups}, fopts);
  auto mask = at::empty({g.rows, (g.n + 7) / 8}, input.options().dtype(at::kByte));
  auto result = at::empty(input.sizes(), input.options());
  if (result.numel() == 0) return {result, qscale, zero, mask};
  const auto x = as_rows(input);
  auto y = result.view({-1, g.n});
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rotation<acc_t> rot(g.n, k, hadamard_k, signs, scale);
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    float* s = qscale.data_ptr<float>();
    float* z = zero.data_ptr<float>();
    uint8_t* m = mask.data_ptr<uint8_t>();
    const int64_t rs = x.stride(0), cs = x.stride(1), mask_row_bytes = (g.n + 7) / 8;
    at::parallel_for(0, g.rows, row_grain(g.n), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(g.n), tmp(k > 1 ? g.n : 0);
      for (int64_t r = r0; r < r1; ++r) {
        load_row(src + r * rs, cs, g.n, buf.data());
        acc_t* rotated = rot.apply(buf.data(), tmp.data(), false);
        uint8_t* bits = m + r * mask_row_bytes;
        bits[mask_row_bytes - 1] = 0;  // the padding bits past n read as 0
        quantize_row(rotated, g, range, symmetric, clip, false, 1, s + r * g.groups, z + r * g.groups, bits);
        store_row(rotated, g.n, dst + r * g.n);
      }
    });
  });
  return {result, qscale, zero, mask};
}

at::Tensor rotate_fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& mask,
                                             const std::optional<at::Tensor>& hadamard_k,
                                             const std::optional<at::Tensor>& signs, double scale) {
  constexpr const char* op = "rotate_fake_quantize_backward";
  const int64_t k = check_hadamard_args(grad, hadamard_k, signs, op);
  check_mask(mask, grad, op);
  const int64_t n = grad.size(-1);
  auto result = at::empty(grad.sizes(), grad.options());
  if (result.numel() == 0) return result;
  const auto dy = as_rows(grad);
  const auto m_c = mask.contiguous();
  auto dx = result.view({-1, n});
  FTCORE_DISPATCH_FLOATING(grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rotation<acc_t> rot(n, k, hadamard_k, signs, scale);
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const uint8_t* m = m_c.data_ptr<uint8_t>();
    scalar_t* dst = dx.data_ptr<scalar_t>();
    const int64_t mask_row_bytes = (n + 7) / 8;
    at::parallel_for(0, dy.size(0), row_grain(n), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(n), tmp(k > 1 ? n : 0);
      for (int64_t r = r0; r < r1; ++r) {
        load_row(gp + r * dy.stride(0), dy.stride(1), n, buf.data());
        cpu::active_kernels().apply_mask_bits(elem_of<acc_t>(), buf.data(), n, m + r * mask_row_bytes);
        store_row(rot.apply(buf.data(), tmp.data(), true), n, dst + r * n);
      }
    });
  });
  return result;
}

// ---- int4 storage ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cpu(const at::Tensor& weight, int64_t group_size,
                                                                 bool symmetric, double clip_ratio) {
  constexpr const char* op = "quantize_int4";
  const Grouping g = check_quantize_int4_args(weight, group_size, clip_ratio);
  const QuantRange range = quant_range(4, symmetric);
  const float clip = static_cast<float>(clip_ratio), code_offset = symmetric ? 8.f : 0.f;
  auto packed = at::empty({g.rows, g.n / 2}, weight.options().dtype(at::kByte));
  auto scale = at::empty({g.rows, g.groups}, weight.options().dtype(at::kFloat));
  auto zero = at::empty({g.rows, g.groups}, weight.options().dtype(at::kByte));
  if (weight.numel() == 0) return {packed, scale, zero};
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t rs = weight.stride(0), cs = weight.stride(1);
    uint8_t* pk = packed.data_ptr<uint8_t>();
    float* sp = scale.data_ptr<float>();
    uint8_t* zp = zero.data_ptr<uint8_t>();
    at::parallel_for(0, g.rows, row_grain(g.n), [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> codes(g.n);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const scalar_t* x = w + r * rs + grp * g.group_size * cs;
          float lo, hi, s, z;
          group_stats(x, cs, g.group_size, symmetric, lo, hi);
          quant_params(lo, hi, range, symmetric, clip, s, z);
          sp[r * g.groups + grp] = s;
          zp[r * g.groups + grp] = static_cast<uint8_t>(z + code_offset);
          for (int64_t i = 0; i < g.group_size; ++i) {
            const acc_t level = quant_clamp(quant_level(static_cast<acc_t>(x[i * cs]), s, z), range);
            codes[grp * g.group_size + i] = static_cast<uint8_t>(level + code_offset);
          }
        }
        for (int64_t j = 0; j < g.n / 2; ++j)
          pk[r * (g.n / 2) + j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
      }
    });
  });
  return {packed, scale, zero};
}

at::Tensor pack_int4_cpu(const at::Tensor& codes) {
  constexpr const char* op = "pack_int4";
  const auto sizes = check_pack_int4_args(codes);
  auto c = codes.contiguous();
  const uint8_t* src = c.data_ptr<uint8_t>();
  for (int64_t i = 0; i < c.numel(); ++i)
    TORCH_CHECK_VALUE(src[i] <= 15, op, ": codes must be in [0, 15], found ", static_cast<int>(src[i]),
                      " at flat position ", i);
  auto out = at::empty(sizes, c.options());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, out.numel(), 65536, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) dst[j] = static_cast<uint8_t>(src[2 * j] | (src[2 * j + 1] << 4));
  });
  return out;
}

at::Tensor unpack_int4_cpu(const at::Tensor& packed) {
  const auto sizes = check_unpack_int4_args(packed);
  auto p = packed.contiguous();
  auto out = at::empty(sizes, p.options());
  const uint8_t* src = p.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, p.numel(), 65536, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) {
      dst[2 * j] = src[j] & 0xF;
      dst[2 * j + 1] = src[j] >> 4;
    }
  });
  return out;
}

at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero_point,
                               int64_t group_size, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_int4";
  const int64_t g = check_int4_args(packed, scale, zero_point, group_size, op);
  auto result = at::empty({packed.size(0), 2 * packed.size(1)}, packed.options().dtype(dtype));
  check_floating(result, op, "dtype");
  if (result.numel() == 0) return result;
  const auto p = packed.contiguous(), s = scale.contiguous(), z = zero_point.contiguous();
  const int64_t in = result.size(1), groups = in / g;
  FTCORE_DISPATCH_FLOATING(dtype, op, [&] {
    const uint8_t* src = p.data_ptr<uint8_t>();
    const float* sp = s.data_ptr<float>();
    const uint8_t* zp = z.data_ptr<uint8_t>();
    scalar_t* dst = result.data_ptr<scalar_t>();
    at::parallel_for(0, result.size(0), row_grain(in), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < in; ++c) {
          const uint8_t code = (src[r * (in / 2) + c / 2] >> (4 * (c & 1))) & 0xF;
          const int64_t at = r * groups + c / g;
          dst[r * in + c] = static_cast<scalar_t>((static_cast<float>(code) - static_cast<float>(zp[at])) * sp[at]);
        }
    });
  });
  return result;
}

void int4_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const at::Tensor& zero_point, int64_t group_size, at::Tensor& out) {
  const int64_t m = x.size(0), in = x.size(1), rows = packed.size(0);
  const bool blocked = in % cpu::kInt4GemvBlock == 0 && group_size % 8 == 0;
  const auto xf = x.to(at::kFloat);
  const auto xs = blocked ? xf.view({m, in / cpu::kInt4GemvBlock, 16, 8}).transpose(2, 3).contiguous()
                          : xf.contiguous();
  const auto p = packed.contiguous(), s = scale.contiguous(), z = zero_point.contiguous();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const uint8_t* zp = z.data_ptr<uint8_t>();
  const float* xp = xs.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const auto& kern = cpu::active_kernels();
  // A task reads at least 64 KB of packed weight, so the thread start-up stays small beside it.
  at::parallel_for(0, rows, std::max<int64_t>(1, 131072 / std::max<int64_t>(in, 1)), [&](int64_t r0, int64_t r1) {
    kern.int4_gemv(pp, sp, zp, in, group_size, blocked, xp, m, r0, r1, yp, rows);
  });
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) {
  m.impl("hadamard_transform", &hadamard_transform_cpu);
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
  m.impl("rotate_fake_quantize", &rotate_fake_quantize_cpu);
  m.impl("rotate_fake_quantize_backward", &rotate_fake_quantize_backward_cpu);
  m.impl("quantize_int4", &quantize_int4_cpu);
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
  m.impl("dequantize_int4", &dequantize_int4_cpu);
}

}  // namespace ftcore
