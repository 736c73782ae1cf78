// Argument checking and shape handling shared by the CPU and CUDA sparse-delta kernels (one place, one wording).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "ftcore/checks.h"
#include "ftcore/shapes.h"
#include "ftcore/sparse_delta.h"

namespace ftcore {

void check_indices(const at::Tensor& indices, const at::Tensor& like, const char* op, const char* name) {
  check_index_dtype(indices, op, name);
  check_same_device(indices, like, op, name, "the data");
}

void check_activation_pair(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  check_floating(grad_output, op, "grad_output");
  check_floating(input, op, "input");
  check_same_dtype(grad_output, input, op, "grad_output", "input");
  check_same_device(grad_output, input, op, "grad_output", "input");
  check_min_dim(grad_output, 1, op, "grad_output");
  check_min_dim(input, 1, op, "input");
  TORCH_CHECK_VALUE(grad_output.sizes().slice(0, grad_output.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
                    op, ": grad_output ", grad_output.sizes(), " and input ", input.sizes(),
                    " must share their leading (token) dims");
}

GradArgs check_grad_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices) {
  constexpr const char* op = "sparse_delta_grad";
  check_activation_pair(grad_output, input, op);
  check_indices(indices, input, op);
  return {as_rows(grad_output), as_rows(input), indices.contiguous()};
}

ProductArgs check_product_args(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
                               int64_t other_features, bool transpose) {
  const char* op = transpose ? "sparse_delta_linear_transpose" : "sparse_delta_linear";
  const char* other_name = transpose ? "in_features" : "out_features";
  check_floating(input, op, transpose ? "grad_output" : "input");
  check_floating(values, op, "values");
  check_min_dim(input, 1, op, transpose ? "grad_output" : "input");
  check_indices(indices, input, op);
  check_same_device(values, input, op, "values", transpose ? "grad_output" : "input");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == indices.numel(), op, ": values must be 1-D with one entry per index (",
                    indices.numel(), "), got shape ", values.sizes());
  TORCH_CHECK_VALUE(other_features >= 0, op, ": ", other_name, " must be >= 0, got ", other_features);
  const int64_t own = input.size(-1);
  const int64_t out = transpose ? own : other_features;
  const int64_t in = transpose ? other_features : own;
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {as_rows(input), indices.contiguous(), values.to(acc).contiguous(), out, in, other_features};
}

void check_weight_args(const at::Tensor& weight, const at::Tensor& indices, const char* op) {
  check_floating(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be the 2-D (out × in) weight, got shape ", weight.sizes());
  check_indices(indices, weight, op);
}

void check_scatter_args(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                        const std::optional<at::Tensor>& base) {
  constexpr const char* op = "sparse_delta_scatter_";
  check_weight_args(weight, indices, op);
  TORCH_CHECK_VALUE(at::has_internal_overlap(weight) != at::MemOverlap::Yes, op,
                    ": weight has elements that share memory (an expanded view); pass a real weight");
  check_floating(values, op, "values");
  check_same_device(values, weight, op, "values", "weight");
  const int64_t k = indices.numel();
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == k, op,
                    ": values must be 1-D with one entry per index (", k, "), got shape ", values.sizes());
  TORCH_CHECK_VALUE(at::get_overlap_status(weight, values) == at::MemOverlapStatus::No, op,
                    ": values share memory with weight, which is written in place; pass a copy");
  if (base) {
    TORCH_CHECK_VALUE(at::get_overlap_status(weight, *base) == at::MemOverlapStatus::No, op,
                      ": base shares memory with weight, which is written in place; pass a copy");
    check_same_dtype(*base, weight, op, "base", "weight");
    check_same_device(*base, weight, op, "base", "weight");
    TORCH_CHECK_VALUE(base->dim() == 1 && base->numel() == k, op,
                      ": base must be 1-D with one entry per index (", k, "), got shape ", base->sizes());
  }
}

}  // namespace ftcore
