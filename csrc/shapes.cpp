// Shape helpers shared by every op family (include/ftcore/shapes.h).
#include "ftcore/shapes.h"

#include <ATen/ATen.h>

namespace ftcore {

at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) tokens *= t.size(d);
  return t.reshape({tokens, t.size(-1)});
}

std::vector<int64_t> with_last_dim(const at::Tensor& input, int64_t features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
  shape.push_back(features);
  return shape;
}

}  // namespace ftcore
