// Dtype dispatch used by every op: floating inputs in four dtypes, indices in two.
#pragma once

#include <ATen/Dispatch.h>

// Defines scalar_t: float, double, at::BFloat16 or at::Half.
#define FTCORE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Defines index_t: int32_t or int64_t.
#define FTCORE_DISPATCH_INDEX(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)
