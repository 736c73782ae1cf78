// Structured sparse blocks (S²FT, Salient Channel Tuning): the contract shared by the CPU and CUDA kernels.
//
// A block is a dense submatrix of a logical out×in weight addressed by an index of distinct, sorted positions:
//   columns mode: index ⊂ [0, in), block = W[:, index]   (out × k)  — inputs of o_proj / down_proj / c_proj
//   rows mode:    index ⊂ [0, out), block = W[index, :]  (k × in)   — outputs of v_proj / up_proj
// The weight's layout never changes: blocks are gathered and scattered by index, not permuted into place.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace ftcore {

// An index of a block: 1-D int32/int64 on `like`'s device. Its values (strictly increasing within [0, limit))
// are validated where they are set (ftcore/_validate.py); the kernels guard memory only, as sparse_delta.h says.
void check_block_index(const at::Tensor& index, const at::Tensor& like, const char* op, const char* name = "index");

// gather_columns: floating input (..., in), columns a block index of [0, in).
void check_gather_columns_args(const at::Tensor& input, const at::Tensor& columns);
// scatter_columns: floating values (..., k), columns a block index of k entries in [0, features).
void check_scatter_columns_args(const at::Tensor& values, const at::Tensor& columns, int64_t features);

// weight is the 2-D logical (out, in) weight; block's shape follows from the mode and the index.
void check_block_args(const at::Tensor& weight, const at::Tensor& index, bool rows, const char* op);

// The (rows, cols) of the block a weight and index describe.
std::pair<int64_t, int64_t> block_shape(const at::Tensor& weight, const at::Tensor& index, bool rows);

// structured_block_scatter_: block (any float dtype) of the right shape; base (weight's dtype) likewise; neither
// may share memory with the weight that is written.
void check_block_scatter_args(const at::Tensor& weight, const at::Tensor& index, const at::Tensor& block,
                              const std::optional<at::Tensor>& base, bool rows);

}  // namespace ftcore
