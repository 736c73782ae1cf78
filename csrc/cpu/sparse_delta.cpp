// CPU kernels of the sparse-delta ops (contract in include/ftcore/sparse_delta.h).
//
// sparse_delta_grad and the two products run over the tokens in chunks. A chunk of each activation is
// transposed once into a panel (features × width, accumulation dtype), so each of the k entries costs one
// contiguous dot product (grad) or axpy (products) of `width` lanes on data that stays in cache. The panels
// are the only workspace: (in + out) · width elements, never out × in. The inner loops come from the best
// instruction-set build this CPU runs (cpu/isa/).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "cpu/isa/kernels.h"
#include "ftcore/checks.h"
#include "ftcore/dispatch.h"
#include "ftcore/shapes.h"
#include "ftcore/sparse_delta.h"

namespace ftcore {

// ---------------------------------------------------------------------------------------------------------------
// Panels

namespace {

cpu::Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::Elem::Float;
    case at::kDouble: return cpu::Elem::Double;
    case at::kBFloat16: return cpu::Elem::BFloat16;
    case at::kHalf: return cpu::Elem::Half;
    default: TORCH_CHECK(false, "ftcore: no CPU kernel for dtype ", t);
  }
}

cpu::StridedMatrix matrix_of(const at::Tensor& rows) {
  return {rows.data_ptr(), elem_of(rows.scalar_type()), rows.stride(0), rows.stride(1)};
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Tokens per chunk, one of the compiled widths: the randomly read operand panel should stay within about
// 1 MB (an L2's worth), and the chunk no wider than the tokens there are.
int64_t panel_width(int64_t tokens, int64_t operand_features, int64_t acc_bytes) {
  constexpr int64_t kOperandBudget = 1 << 20;
  int64_t width = cpu::kPanelWidths[0];
  for (const int64_t w : cpu::kPanelWidths) {
    if (w * operand_features * acc_bytes > kOperandBudget) break;
    width = w;
    if (w >= tokens) break;
  }
  return width;
}

// A delta's entries arranged for the inner loops (cpu/isa/kernels.h, EntryGroups); built once per call in
// O(k + groups), so the loops over chunks never divide.
struct GroupedEntries {
  std::vector<int64_t> ptr;
  std::vector<int32_t> operand;
  at::Tensor values;  // per position, accumulation dtype; undefined for sparse_delta_grad
  cpu::EntryGroups view() const { return {ptr.data(), operand.data(), values.defined() ? values.data_ptr() : nullptr}; }
};

void check_int32_features(int64_t out, int64_t in, const char* op) {
  TORCH_CHECK_VALUE(out < (int64_t(1) << 31) && in < (int64_t(1) << 31), op,
                    ": weights with 2^31 or more rows or columns are not supported, got ", out, "x", in);
}

// Groups are rows of Δ: the sorted entries in their own order, each paired with its column. The pass is also the
// memory guard (checks.h): an entry below its row's start (unsorted or negative) or one left over past the last
// row (out of range) raises.
GroupedEntries group_by_rows(const at::Tensor& indices, int64_t out, int64_t in, const at::Tensor& values,
                             const char* op) {
  const int64_t k = indices.numel();
  GroupedEntries g{std::vector<int64_t>(out + 1), std::vector<int32_t>(k), values};
  FTCORE_DISPATCH_INDEX(indices.scalar_type(), "group_by_rows", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    int64_t t = 0;
    bool ordered = true;
    for (int64_t r = 0; r < out; ++r) {
      g.ptr[r] = t;
      for (; t < k && static_cast<int64_t>(idx[t]) < (r + 1) * in; ++t) {
        ordered &= static_cast<int64_t>(idx[t]) >= r * in;
        g.operand[t] = static_cast<int32_t>(idx[t] - r * in);
      }
    }
    g.ptr[out] = t;
    if (!ordered || t != k) fail_index_guard(op, "indices", "sorted and in range");
  });
  return g;
}

// Groups are columns of Δ: a stable counting sort by column, each entry paired with its row. The first pass is
// the memory guard (checks.h).
GroupedEntries group_by_columns(const at::Tensor& indices, int64_t out, int64_t in, const at::Tensor& values,
                                const char* op) {
  const int64_t k = indices.numel();
  GroupedEntries g{std::vector<int64_t>(in + 1, 0), std::vector<int32_t>(k), at::Tensor()};
  std::vector<int64_t> order(k);
  FTCORE_DISPATCH_INDEX(indices.scalar_type(), "group_by_columns", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    std::vector<int64_t> rows(k);
    int64_t row = 0;
    for (int64_t t = 0; t < k; ++t) {  // sorted: the row only grows
      const int64_t v = idx[t];
      if (v < row * in || v >= out * in) fail_index_guard(op, "indices", "sorted and in range");
      while (v >= (row + 1) * in) ++row;
      rows[t] = row;
      ++g.ptr[idx[t] - row * in + 1];
    }
    for (int64_t c = 0; c < in; ++c) g.ptr[c + 1] += g.ptr[c];
    std::vector<int64_t> next(g.ptr.begin(), g.ptr.end() - 1);
    for (int64_t t = 0; t < k; ++t) {
      const int64_t p = next[idx[t] - rows[t] * in]++;
      order[p] = t;
      g.operand[p] = static_cast<int32_t>(rows[t]);
    }
  });
  g.values = values.index_select(0, at::from_blob(order.data(), {k}, at::kLong));
  return g;
}

// Panels are read as 64-byte vectors (cpu/isa): c10's CPU allocator aligns to 64 bytes; check, never assume.
at::Tensor new_panel(int64_t elements, const at::TensorOptions& options) {
  auto panel = at::empty({elements}, options);
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(panel.data_ptr()) % 64 == 0, "ftcore: panel not 64-byte aligned");
  return panel;
}

// Loads chunk [n0, n0 + count) of two matrices into their panels in one parallel pass over both feature ranges.
void load_panels(const cpu::Kernels& K, const cpu::StridedMatrix& a, int64_t a_features, void* a_panel,
                 const cpu::StridedMatrix& b, int64_t b_features, void* b_panel, int64_t n0, int64_t count,
                 int64_t width) {
  at::parallel_for(0, a_features + b_features, 16, [&](int64_t lo, int64_t hi) {
    if (lo < a_features) K.load_panel(a, n0, count, lo, std::min(hi, a_features), a_panel, width);
    if (hi > a_features && b_panel)
      K.load_panel(b, n0, count, std::max(lo, a_features) - a_features, hi - a_features, b_panel, width);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// sparse_delta_grad: dvalues[t] = sum_n grad_output[n, row(t)] * input[n, col(t)]

at::Tensor sparse_delta_grad_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices) {
  const auto a = check_grad_args(grad_output, input, indices);
  const int64_t tokens = a.input.size(0), out = a.grad_output.size(1), in = a.input.size(1);
  const int64_t k = a.indices.numel();
  const auto acc = acc_type(input.scalar_type());
  auto result = at::zeros({k}, input.options().dtype(acc));
  if (k == 0 || tokens == 0) return result;
  check_int32_features(out, in, "sparse_delta_grad");

  const cpu::Kernels& K = cpu::active_kernels();
  const auto entries = group_by_rows(a.indices, out, in, at::Tensor(), "sparse_delta_grad");
  const int64_t width = panel_width(tokens, in, at::elementSize(acc));
  auto x_panel = new_panel(in * width, result.options());
  auto g_panel = new_panel(out * width, result.options());
  const auto X = matrix_of(a.input), G = matrix_of(a.grad_output);
  for (int64_t n0 = 0; n0 < tokens; n0 += width) {
    const int64_t count = std::min(width, tokens - n0);
    load_panels(K, X, in, x_panel.data_ptr(), G, out, g_panel.data_ptr(), n0, count, width);
    at::parallel_for(0, out, 8, [&](int64_t r0, int64_t r1) {
      K.dot_groups(elem_of(acc), g_panel.data_ptr(), x_panel.data_ptr(), width, entries.view(), r0, r1,
                   result.data_ptr());
    });
  }
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// Products: input · Δᵀ (groups = rows of Δ) and grad_output · Δ (groups = columns of Δ)

namespace {

at::Tensor product_cpu(const ProductArgs& a, const at::Tensor& original_input, bool transpose) {
  const int64_t tokens = a.input.size(0);
  const int64_t operand_features = a.input.size(1);
  const int64_t groups = a.result_features;
  auto result = at::empty(with_last_dim(original_input, groups), original_input.options());
  if (result.numel() == 0) return result;
  auto result_rows = as_rows(result);
  if (a.indices.numel() == 0) return result.zero_();
  const char* op = transpose ? "sparse_delta_linear_transpose" : "sparse_delta_linear";
  check_int32_features(a.out_features, a.in_features, op);

  const auto entries = transpose ? group_by_columns(a.indices, a.out_features, a.in_features, a.values, op)
                                 : group_by_rows(a.indices, a.out_features, a.in_features, a.values, op);
  const cpu::Kernels& K = cpu::active_kernels();
  const auto acc = a.values.scalar_type();
  const int64_t width = panel_width(tokens, operand_features, at::elementSize(acc));
  auto src_panel = new_panel(operand_features * width, a.values.options());
  auto dst_panel = new_panel(groups * width, a.values.options());
  const auto src = matrix_of(a.input), dst = matrix_of(result_rows);
  for (int64_t n0 = 0; n0 < tokens; n0 += width) {
    const int64_t count = std::min(width, tokens - n0);
    load_panels(K, src, operand_features, src_panel.data_ptr(), src, 0, nullptr, n0, count, width);
    at::parallel_for(0, groups, 8, [&](int64_t g0, int64_t g1) {
      K.group_sums(elem_of(acc), src_panel.data_ptr(), width, entries.view(), g0, g1, dst_panel.data_ptr());
      K.store_panel(dst_panel.data_ptr(), width, count, g0, g1, dst, n0);
    });
  }
  return result;
}

}  // namespace

at::Tensor sparse_delta_linear_cpu(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& values,
                                   int64_t out_features) {
  return product_cpu(check_product_args(input, indices, values, out_features, /*transpose=*/false), input, false);
}

at::Tensor sparse_delta_linear_transpose_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                             const at::Tensor& values, int64_t in_features) {
  return product_cpu(check_product_args(grad_output, indices, values, in_features, /*transpose=*/true), grad_output,
                     true);
}

// ---------------------------------------------------------------------------------------------------------------
// Weight-side ops: scatter (merge / unmerge / compose) and gather

namespace {

// Element offset of a flat index in a strided out×in weight. Sorted indices change row rarely, so the cursor
// divides only when they do.
struct RowCursor {
  int64_t in, stride0, stride1;
  int64_t row = -1, row_start = 0;
  int64_t offset(int64_t v) {
    if (row < 0 || v < row_start || v >= row_start + in) {
      row = v / in;
      row_start = row * in;
    }
    return row * stride0 + (v - row_start) * stride1;
  }
};

}  // namespace

void sparse_delta_scatter_cpu(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha,
                              const std::optional<at::Tensor>& base) {
  constexpr const char* op = "sparse_delta_scatter_";
  check_scatter_args(weight, indices, values, base);
  const int64_t k = indices.numel();
  if (k == 0) return;
  const auto idx = indices.contiguous();
  const bool restore = alpha == 0.0;  // leave the start value exactly; values are not read
  const auto vals = restore ? at::Tensor() : values.to(acc_type(weight.scalar_type())).contiguous();
  const auto base_c = base ? base->contiguous() : at::Tensor();
  const int64_t in = weight.size(1), s0 = weight.stride(0), s1 = weight.stride(1), numel = weight.numel();
  std::atomic<bool> guard_tripped{false};  // the memory guard (checks.h), set by any range
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = weight.data_ptr<scalar_t>();
    const acc_t* v = restore ? nullptr : vals.data_ptr<acc_t>();
    const scalar_t* b = base ? base_c.data_ptr<scalar_t>() : nullptr;
    const acc_t a = static_cast<acc_t>(alpha);
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      const index_t* ip = idx.data_ptr<index_t>();
      // Entries at one position (a run of equal indices) add up and are written once, by the range that holds
      // the run's first entry: a range skips a run begun before it and finishes the one it begins.
      at::parallel_for(0, k, 4096, [&](int64_t t0, int64_t t1) {
        RowCursor cursor{in, s0, s1};
        int64_t t = t0;
        while (t > 0 && t < t1 && ip[t] == ip[t - 1]) ++t;
        while (t < t1) {
          int64_t r = t + 1;
          while (r < k && ip[r] == ip[t]) ++r;
          // A repeat split by unsorted entries would be written by two ranges; out of range, out of bounds.
          if (ip[t] < 0 || ip[t] >= numel || (r < k && ip[r] < ip[t])) {
            guard_tripped = true;
            return;
          }
          const int64_t off = cursor.offset(ip[t]);
          const acc_t start = b ? static_cast<acc_t>(b[t]) : static_cast<acc_t>(w[off]);
          if (restore) {
            w[off] = static_cast<scalar_t>(start);
          } else {
            acc_t sum = 0;
            for (int64_t e = t; e < r; ++e) sum += v[e];
            w[off] = static_cast<scalar_t>(start + a * sum);
          }
          t = r;
        }
      });
    });
  });
  if (guard_tripped) fail_index_guard(op, "indices", "sorted and in range");
}

at::Tensor sparse_delta_gather_cpu(const at::Tensor& weight, const at::Tensor& indices) {
  constexpr const char* op = "sparse_delta_gather";
  check_weight_args(weight, indices, op);
  const auto idx = indices.contiguous();
  const int64_t k = idx.numel();
  auto result = at::empty({k}, weight.options());
  if (k == 0) return result;
  const int64_t in = weight.size(1), s0 = weight.stride(0), s1 = weight.stride(1), numel = weight.numel();
  std::atomic<bool> guard_tripped{false};  // the memory guard (checks.h)
  FTCORE_DISPATCH_FLOATING(weight.scalar_type(), op, [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* r = result.data_ptr<scalar_t>();
    FTCORE_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
      const index_t* ip = idx.data_ptr<index_t>();
      at::parallel_for(0, k, 4096, [&](int64_t t0, int64_t t1) {
        RowCursor cursor{in, s0, s1};
        for (int64_t t = t0; t < t1; ++t) {
          if (ip[t] < 0 || ip[t] >= numel) {
            guard_tripped = true;
            return;
          }
          r[t] = w[cursor.offset(ip[t])];
        }
      });
    });
  });
  if (guard_tripped) fail_index_guard(op, "indices", "in range");
  return result;
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) {
  m.impl("sparse_delta_grad", &sparse_delta_grad_cpu);
  m.impl("sparse_delta_linear", &sparse_delta_linear_cpu);
  m.impl("sparse_delta_linear_transpose", &sparse_delta_linear_transpose_cpu);
  m.impl("sparse_delta_scatter_", &sparse_delta_scatter_cpu);
  m.impl("sparse_delta_gather", &sparse_delta_gather_cpu);
}

}  // namespace ftcore
