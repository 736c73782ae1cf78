// int4_linear: input · dequant(W)ᵀ + bias for an int4 weight (layout in include/ftcore/quant.h), written once
// against ATen for both devices. The weight is dequantized a block of output rows at a time, in the input's
// dtype, into a buffer sized to stay in cache, and multiplied by the vendor GEMM: the full-precision weight is
// never formed, and the GEMM does the arithmetic it is best at. A handful of rows on the CPU (decode) go to a
// matrix-vector kernel that reads the packed weight once instead (cpu/isa, int4_gemv).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ftcore/checks.h"
#include "ftcore/quant.h"
#include "ftcore/shapes.h"

namespace ftcore {

namespace {

// Input rows up to which the CPU takes the matrix-vector path. Its cost grows with the rows while the GEMM path
// pays a fixed dequantization; on a 2-core AVX-512 machine at 4096×4096 they cross near 64 rows (bench
// bench_quant_model.py prints both at batch 1).
constexpr int64_t kInt4GemvRows = 32;

at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                           int64_t group_size, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ftcore::dequantize_int4", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         at::ScalarType)>();
  return op.call(packed, scale, zero, group_size, dtype);
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& zero_point, int64_t group_size, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int4_linear";
  check_int4_args(packed, scale, zero_point, group_size, op);
  check_floating(input, op, "input");
  check_min_dim(input, 1, op, "input");
  check_same_device(input, packed, op, "input", "packed");
  const int64_t out = packed.size(0), in = 2 * packed.size(1);
  TORCH_CHECK_VALUE(input.size(-1) == in, op, ": input's last dim (", input.size(-1),
                    ") must equal the weight's in_features (", in, ")");
  if (bias) {
    check_same_dtype(*bias, input, op, "bias", "input");
    check_same_device(*bias, input, op, "bias", "input");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape (", out, "), got ",
                      bias->sizes());
  }
  const int64_t g = group_size > 0 ? group_size : in;
  const auto x = as_rows(input);
  // Decode (a few rows on the CPU): one pass over the packed weight beats dequantizing it for a GEMM that then
  // does almost no arithmetic per weight. float64 keeps the GEMM path, whose arithmetic is in float64.
  if (input.is_cpu() && x.size(0) <= kInt4GemvRows && input.scalar_type() != at::kDouble) {
    auto y = at::empty({x.size(0), out}, input.options().dtype(at::kFloat));
    if (y.numel() > 0) int4_gemv_cpu(x, packed, scale, zero_point, g, y);
    if (bias) y.add_(*bias);  // in float32, rounded once below
    return y.to(input.scalar_type()).view(with_last_dim(input, out));
  }
  // On the CPU half inputs are dequantized and multiplied in float32, as the decode path does, so a sequence's
  // prefill and its decode steps (and every batch size) compute alike; CUDA keeps the input's dtype for the
  // tensor cores.
  if (input.is_cpu() && at::isReducedFloatingType(input.scalar_type())) {
    auto y = int4_linear(input.to(at::kFloat), packed, scale, zero_point, group_size,
                         bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt);
    return y.to(input.scalar_type());
  }
  auto result = at::empty({x.size(0), out}, input.options());
  // About 2^20 dequantized weights a block (4 MB in fp32): large enough for an efficient GEMM, small enough for L2.
  const int64_t block = std::max<int64_t>(64, (int64_t(1) << 20) / std::max<int64_t>(in, 1));
  for (int64_t r0 = 0; r0 < out; r0 += block) {
    const int64_t len = std::min(block, out - r0);
    const auto w = dequantize_int4(packed.narrow(0, r0, len), scale.narrow(0, r0, len),
                                   zero_point.narrow(0, r0, len), group_size, input.scalar_type());
    if (len == out) {
      at::mm_out(result, x, w.t());
    } else {
      result.narrow(1, r0, len).copy_(at::mm(x, w.t()));
    }
  }
  if (bias) result.add_(*bias);
  return result.view(with_last_dim(input, out));
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) { m.impl("int4_linear", &int4_linear); }
#if FTCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(ftcore, CUDA, m) { m.impl("int4_linear", &int4_linear); }
#endif

}  // namespace ftcore
