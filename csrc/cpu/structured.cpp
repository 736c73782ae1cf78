// CPU kernels of the structured-block ops (contract in include/ftcore/structured.h). These move data only —
// the block's arithmetic runs in the vendor GEMM (composite/structured_block_grad.cpp) — so they are plain
// parallel loops over rows, sized to keep both threads streaming.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ftcore/checks.h"
#include "ftcore/dispatch.h"
#include "ftcore/shapes.h"
#include "ftcore/structured.h"

namespace ftcore {

namespace {

// Rows handed to a thread at a time: enough elements to amortise the parallel region.
int64_t row_grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elements, 1)); }


}  // namespace

at::Tensor gather_columns_cpu(const at::Tensor& input, const at::Tensor& columns) {
  constexpr const char* op = "gather_columns";
  check_gather_columns_args(input, columns);
  const auto idx = columns.contiguous();
  const int64_t k = idx.numel();
  auto result = at::empty(with_last_dim(input, k), input.options());
  if (result.numel() == 0) return result;
  const auto x = as_rows(input);
  auto out = result.view({-1, k});
  const int64_t rs = x.stride(0), cs = x.stride(1);
  FTCORE_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      const scalar_t* src = x.data_ptr<scalar_t>();
      const index_t* col = idx.data_ptr<index_t>();
      guard_block_index(col, k, x.size(1), op, "columns");
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, x.size(0), row_grain(k), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t j = 0; j < k; ++j) dst[n * k + j] = src[n * rs + static_cast<int64_t>(col[j]) * cs];
      });
    });
  });
  return result;
}

at::Tensor scatter_columns_cpu(const at::Tensor& values, const at::Tensor& columns, int64_t features) {
  constexpr const char* op = "scatter_columns";
  check_scatter_columns_args(values, columns, features);
  const auto idx = columns.contiguous();
  const int64_t k = idx.numel();
  auto result = at::zeros(with_last_dim(values, features), values.options());
  if (result.numel() == 0 || k == 0) return result;
  const auto v = as_rows(values);
  auto out = result.view({-1, features});
  const int64_t rs = v.stride(0), cs = v.stride(1);
  FTCORE_DISPATCH_FLOATING(values.scalar_type(), op, [&] {
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      const scalar_t* src = v.data_ptr<scalar_t>();
      const index_t* col = idx.data_ptr<index_t>();
      guard_block_index(col, k, features, op, "columns");
      scalar_t* dst = out.data_ptr<scalar_t>();
      at::parallel_for(0, v.size(0), row_grain(features), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t j = 0; j < k; ++j) dst[n * features + static_cast<int64_t>(col[j])] = src[n * rs + j * cs];
      });
    });
  });
  return result;
}

namespace {

// Visits every element of a block: f(block_row, block_col, weight_offset). Rows of the block run in parallel.
template <typename index_t, typename F>
void for_block(const at::Tensor& weight, const index_t* idx, int64_t k, bool rows, const char* op, F&& f) {
  const int64_t out = weight.size(0), in = weight.size(1), s0 = weight.stride(0), s1 = weight.stride(1);
  guard_block_index(idx, k, rows ? out : in, op, "index");
  const int64_t block_rows = rows ? k : out, block_cols = rows ? in : k;
  at::parallel_for(0, block_rows, row_grain(block_cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t w_row = rows ? static_cast<int64_t>(idx[r]) : r;
      for (int64_t c = 0; c < block_cols; ++c) {
        const int64_t w_col = rows ? c : static_cast<int64_t>(idx[c]);
        f(r, c, w_row * s0 + w_col * s1);
      }
    }
  });
}

}  // namespace

void structured_block_scatter_cpu(at::Tensor& weight, const at::Tensor& index, const at::Tensor& block, double alpha,
                                  const std::optional<at::Tensor>& base, bool rows) {
  constexpr const char* op = "structured_block_scatter_";
  check_block_scatter_args(weight, index, block, base, rows);
  const auto idx = index.contiguous();
  if (idx.numel() == 0 || weight.numel() == 0) return;
  const bool restore = alpha == 0.0;  // leave the start value exactly; block is not read
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto blk = restore ? at::Tensor() : block.to(acc).contiguous();
  const auto base_c = base ? base->contiguous() : at::Tensor();
  const int64_t block_cols = rows ? weight.size(1) : idx.numel();
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = weight.data_ptr<scalar_t>();
    const acc_t* b = restore ? nullptr : blk.data_ptr<acc_t>();
    const scalar_t* s = base ? base_c.data_ptr<scalar_t>() : nullptr;
    const acc_t a = static_cast<acc_t>(alpha);
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      for_block(weight, idx.data_ptr<index_t>(), idx.numel(), rows, op, [&](int64_t r, int64_t c, int64_t off) {
        const int64_t e = r * block_cols + c;
        const acc_t start = s ? static_cast<acc_t>(s[e]) : static_cast<acc_t>(w[off]);
        w[off] = static_cast<scalar_t>(restore ? start : start + a * b[e]);
      });
    });
  });
}

at::Tensor structured_block_gather_cpu(const at::Tensor& weight, const at::Tensor& index, bool rows) {
  constexpr const char* op = "structured_block_gather";
  check_block_args(weight, index, rows, op);
  const auto idx = index.contiguous();
  const auto [r, c] = block_shape(weight, idx, rows);
  auto result = at::empty({r, c}, weight.options());
  if (result.numel() == 0) return result;
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      for_block(weight, idx.data_ptr<index_t>(), idx.numel(), rows, op,
                [&, cols = c](int64_t br, int64_t bc, int64_t off) { out[br * cols + bc] = w[off]; });
    });
  });
  return result;
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) {
  m.impl("gather_columns", &gather_columns_cpu);
  m.impl("scatter_columns", &scatter_columns_cpu);
  m.impl("structured_block_scatter_", &structured_block_scatter_cpu);
  m.impl("structured_block_gather", &structured_block_gather_cpu);
}

}  // namespace ftcore
