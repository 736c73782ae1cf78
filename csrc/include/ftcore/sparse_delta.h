// Sparse delta updates: the contract shared by the CPU and CUDA kernels.
//
// A delta Δ of a logical out×in weight is a 1-D tensor of flat row-major positions `indices` (int32 or int64,
// non-decreasing, each in [0, out·in)) and a 1-D tensor `values` of the same length. Entry t sits at
// row = indices[t] / in, col = indices[t] % in. Repeated positions add up. No kernel ever forms an out×in tensor.
//
// Activations are (..., features) tensors; the ops view them as tokens × features (N × in or N × out).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace ftcore {

// Checks dtype/rank/device of an index tensor against a tensor on the op's device, on every call. Index values
// (range, order) are validated once, with a message naming the entry, by ftcore's one entry point
// (ftcore/_validate.py) when they are set: in the public wrappers, and in the modules at construction and load.
// The kernels only guard memory: an index they read that is out of range, or out of order where order decides
// the memory touched (across rows, or runs of a repeated position in the scatter), raises (CPU, inside the pass
// that reads it) or trips a device-side assert (CUDA); it is never dereferenced.
void check_indices(const at::Tensor& indices, const at::Tensor& like, const char* op, const char* name = "indices");

// grad_output (..., out) and input (..., in): floating, one dtype and device, the same leading (token) dims.
void check_activation_pair(const at::Tensor& grad_output, const at::Tensor& input, const char* op);

// The pieces of sparse_delta_grad, checked and viewed as 2-D / contiguous 1-D.
struct GradArgs {
  at::Tensor grad_output;  // N × out
  at::Tensor input;        // N × in
  at::Tensor indices;      // k, contiguous
};
GradArgs check_grad_args(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices);

// The pieces of sparse_delta_linear (transpose=false: input N×in, Δ out×in, result N×out) and of
// sparse_delta_linear_transpose (transpose=true: input is grad_output N×out, result N×in).
struct ProductArgs {
  at::Tensor input;    // N × (in, or out when transposed)
  at::Tensor indices;  // k, contiguous
  at::Tensor values;   // k, contiguous, in the accumulation dtype (float32, or float64 for float64 inputs)
  int64_t out_features;
  int64_t in_features;
  int64_t result_features;  // columns of the result
};
ProductArgs check_product_args(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
                               int64_t other_features, bool transpose);

// Weight-side ops (scatter / gather) take the logical out×in weight as a 2-D tensor of any strides
// (a GPT-2 Conv1D weight is passed as weight.t()).
void check_weight_args(const at::Tensor& weight, const at::Tensor& indices, const char* op);

// sparse_delta_scatter_: weight is written in place (no overlapping elements); values and base (weight's dtype)
// hold one entry per index.
void check_scatter_args(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                        const std::optional<at::Tensor>& base);

}  // namespace ftcore
