// Argument checking shared by the CPU and CUDA structured-block kernels.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "ftcore/checks.h"
#include "ftcore/structured.h"

namespace ftcore {

void check_block_index(const at::Tensor& index, const at::Tensor& like, const char* op, const char* name) {
  check_index_dtype(index, op, name);
  check_same_device(index, like, op, name, "the data");
}

void check_gather_columns_args(const at::Tensor& input, const at::Tensor& columns) {
  constexpr const char* op = "gather_columns";
  check_floating(input, op, "input");
  check_min_dim(input, 1, op, "input");
  check_block_index(columns, input, op, "columns");
}

void check_scatter_columns_args(const at::Tensor& values, const at::Tensor& columns, int64_t features) {
  constexpr const char* op = "scatter_columns";
  check_floating(values, op, "values");
  check_min_dim(values, 1, op, "values");
  TORCH_CHECK_VALUE(features >= 0, op, ": features must be >= 0, got ", features);
  check_block_index(columns, values, op, "columns");
  TORCH_CHECK_VALUE(values.size(-1) == columns.numel(), op, ": values' last dim (", values.size(-1),
                    ") must equal the number of columns (", columns.numel(), ")");
}

std::pair<int64_t, int64_t> block_shape(const at::Tensor& weight, const at::Tensor& index, bool rows) {
  return rows ? std::make_pair(index.numel(), weight.size(1)) : std::make_pair(weight.size(0), index.numel());
}

void check_block_args(const at::Tensor& weight, const at::Tensor& index, bool rows, const char* op) {
  check_floating(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be the 2-D (out × in) weight, got shape ", weight.sizes());
  check_block_index(index, weight, op);
}

void check_block_scatter_args(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& block,
                              const std::optional<at::Tensor>& base, bool rows) {
  constexpr const char* op = "structured_block_scatter_";
  check_block_args(weight, index, rows, op);
  TORCH_CHECK_VALUE(at::has_internal_overlap(weight) != at::MemOverlap::Yes, op,
                    ": weight has elements that share memory (an expanded view); pass a real weight");
  const auto [r, c] = block_shape(weight, index, rows);
  check_floating(block, op, "block");
  check_same_device(block, weight, op, "block", "weight");
  TORCH_CHECK_VALUE(block.dim() == 2 && block.size(0) == r && block.size(1) == c, op, ": block must be ", r, "x", c,
                    " for this weight and index (", rows ? "rows" : "columns", " mode), got shape ", block.sizes());
  TORCH_CHECK_VALUE(at::get_overlap_status(weight, block) == at::MemOverlapStatus::No, op,
                    ": block shares memory with weight, which is written in place; pass a copy");
  if (base) {
    check_same_dtype(*base, weight, op, "base", "weight");
    check_same_device(*base, weight, op, "base", "weight");
    TORCH_CHECK_VALUE(base->dim() == 2 && base->size(0) == r && base->size(1) == c, op, ": base must be ", r, "x", c,
                      ", got shape ", base->sizes());
    TORCH_CHECK_VALUE(at::get_overlap_status(weight, *base) == at::MemOverlapStatus::No, op,
                      ": base shares memory with weight, which is written in place; pass a copy");
  }
}

}  // namespace ftcore
