// Shape helpers every op family uses: activations are (..., features) tensors that kernels see as
// tokens × features.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ftcore {

// A (..., features) tensor as tokens × features; a view when the layout allows, else a copy.
at::Tensor as_rows(const at::Tensor& t);

// A (..., features) tensor's leading dims, then `features`: the shape of a result over the same tokens.
std::vector<int64_t> with_last_dim(const at::Tensor& input, int64_t features);

}  // namespace ftcore
