// Structured-block ops whose arithmetic is a GEMM: written once against ATen (the vendor GEMM is the right kernel
// on either device) around the gather kernels of cpu/structured.cpp and cuda/structured.cu.
//
// structured_block_grad: a block's weight gradient, grad_output[:, rows]ᵀ · input[:, columns], in fp32 (fp64 for
//   float64) whatever the activations' dtype, so a bf16 model's fp32 block accumulates exact sums. Only the
//   gathered slices are formed; for a column block `input` is normally the compact slice saved in forward.
// multi_adapter_linear: serving many structured adapters in one batch without merging any: one base GEMM for
//   the whole batch, then per adapter one small GEMM on its rows' gathered columns.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ftcore/checks.h"
#include "ftcore/shapes.h"
#include "ftcore/sparse_delta.h"
#include "ftcore/structured.h"

namespace ftcore {

namespace {

at::Tensor gather_columns(const at::Tensor& input, const at::Tensor& columns) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ftcore::gather_columns", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(input, columns);
}

}  // namespace

at::Tensor structured_block_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                 const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& columns) {
  constexpr const char* op = "structured_block_grad";
  check_activation_pair(grad_output, input, op);
  if (rows) check_block_index(*rows, grad_output, op, "rows");
  if (columns) check_block_index(*columns, input, op, "columns");
  const auto a = as_rows(rows ? gather_columns(grad_output, *rows) : grad_output);
  const auto b = as_rows(columns ? gather_columns(input, *columns) : input);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (a.is_cuda() && input.scalar_type() != acc) return at::mm(a.t(), b, acc);  // 16-bit in, fp32 out (cuBLASLt)
  return at::mm(a.t().to(acc), b.to(acc));  // no copies for fp32/fp64; the CPU has no 16-bit-in fp32-out GEMM
}

at::Tensor multi_adapter_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& adapter_ids, const at::Tensor& index, const at::Tensor& offsets,
                                const at::Tensor& blocks, bool rows) {
  constexpr const char* op = "multi_adapter_linear";
  check_floating(input, op, "input");
  check_min_dim(input, 2, op, "input");
  check_floating(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(-1), op, ": weight must be (out, ",
                    input.size(-1), "), got shape ", weight.sizes());
  check_index_dtype(adapter_ids, op, "adapter_ids");
  TORCH_CHECK_VALUE(adapter_ids.numel() == input.size(0), op, ": adapter_ids needs one entry per batch row (",
                    input.size(0), "), got ", adapter_ids.numel());
  check_index_dtype(index, op, "index");
  check_index_dtype(offsets, op, "offsets");
  const int64_t out = weight.size(0), in = weight.size(1);
  const auto offs = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t adapters = offs.numel() - 1;
  TORCH_CHECK_VALUE(adapters >= 0, op, ": offsets must hold at least one entry");
  const int64_t* off = offs.data_ptr<int64_t>();
  const int64_t total = index.numel();
  TORCH_CHECK_VALUE(off[0] == 0 && off[adapters] == total, op, ": offsets must run from 0 to index.numel() (", total,
                    ")");
  TORCH_CHECK_VALUE(blocks.dim() == 2 && (rows ? blocks.size(0) == total && blocks.size(1) == in
                                               : blocks.size(0) == out && blocks.size(1) == total),
                    op, ": blocks must be ", rows ? total : out, "x", rows ? in : total, " (", rows ? "rows" : "columns",
                    " stacked along dim ", rows ? 0 : 1, "), got shape ", blocks.sizes());
  if (input.size(0) == 0) return at::linear(input, weight, bias);
  const auto ids = adapter_ids.to(at::kCPU, at::kLong);
  const auto id_min = ids.min().item<int64_t>(), id_max = ids.max().item<int64_t>();
  TORCH_CHECK_INDEX(id_min >= -1 && id_max < adapters, op, ": adapter_ids must be in [-1, ", adapters,
                    ") (-1: base model), got ", id_min < -1 ? id_min : id_max);

  auto y = at::linear(input, weight, bias);
  const auto device_ids = adapter_ids.to(input.device(), at::kLong);
  for (int64_t a = 0; a < adapters; ++a) {
    const int64_t begin = off[a], k = off[a + 1] - off[a];
    TORCH_CHECK_VALUE(k >= 0, op, ": offsets must be non-decreasing");
    if (k == 0 || !(ids == a).any().item<bool>()) continue;
    const auto sel = (device_ids == a).nonzero().squeeze(1);
    const auto idx = index.slice(0, begin, begin + k);
    check_block_index(idx, input, op, "index");
    const auto x = input.index_select(0, sel);
    if (rows) {  // y[..., idx] += x · blockᵀ for the adapter's rows of the batch
      const auto block = blocks.narrow(0, begin, k).to(input.scalar_type());
      auto ya = y.index_select(0, sel);
      ya.index_add_(-1, idx, at::matmul(x, block.t()));
      y.index_copy_(0, sel, ya);
    } else {  // y += x[..., idx] · blockᵀ
      const auto block = blocks.narrow(1, begin, k).to(input.scalar_type());
      y.index_add_(0, sel, at::matmul(gather_columns(x, idx), block.t()));
    }
  }
  return y;
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) {
  m.impl("structured_block_grad", &structured_block_grad);
  m.impl("multi_adapter_linear", &multi_adapter_linear);
}
#if FTCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(ftcore, CUDA, m) {
  m.impl("structured_block_grad", &structured_block_grad);
  m.impl("multi_adapter_linear", &multi_adapter_linear);
}
#endif

}  // namespace ftcore
