// CPU row kernels of linear_cross_entropy (include/ftcore/linear_cross_entropy.h): rows in parallel, each row's
// two reads and one rewrite done by the instruction-set builds of cpu/isa/ (a vectorised exp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/isa/kernels.h"
#include "ftcore/linear_cross_entropy.h"

namespace ftcore {

namespace {

cpu::Elem elem_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
  return t.scalar_type() == at::kDouble ? cpu::Elem::Double : cpu::Elem::Float;
}

// Rows a thread takes at a time: a row is a whole vocabulary, so one is already worth a task.
constexpr int64_t kRowGrain = 1;

}  // namespace

at::Tensor lce_row_logsumexp_cpu(const at::Tensor& logits) {
  TORCH_INTERNAL_ASSERT(logits.dim() == 2 && logits.is_contiguous());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto lse = at::empty({rows}, logits.options());
  const auto acc = elem_of(logits);
  const size_t bytes = logits.element_size();
  const char* x = static_cast<const char*>(logits.const_data_ptr());
  char* out = static_cast<char*>(lse.data_ptr());
  const auto& kern = cpu::active_kernels();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    kern.row_logsumexp(acc, x + r0 * vocab * bytes, vocab, r1 - r0, out + r0 * bytes);
  });
  return lse;
}

void lce_softmax_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& coef,
                               const at::Tensor& labels) {
  TORCH_INTERNAL_ASSERT(logits.dim() == 2 && logits.is_contiguous() && lse.is_contiguous() && coef.is_contiguous());
  TORCH_INTERNAL_ASSERT(labels.scalar_type() == at::kLong && labels.is_contiguous());
  TORCH_INTERNAL_ASSERT(lse.scalar_type() == logits.scalar_type() && coef.scalar_type() == logits.scalar_type());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_INTERNAL_ASSERT(lse.numel() == rows && coef.numel() == rows && labels.numel() == rows);
  const auto acc = elem_of(logits);
  const size_t bytes = logits.element_size();
  char* x = static_cast<char*>(logits.data_ptr());
  const char* m = static_cast<const char*>(lse.const_data_ptr());
  const char* c = static_cast<const char*>(coef.const_data_ptr());
  const int64_t* y = labels.const_data_ptr<int64_t>();
  const auto& kern = cpu::active_kernels();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t r0, int64_t r1) {
    kern.softmax_grad_rows(acc, x + r0 * vocab * bytes, vocab, r1 - r0, m + r0 * bytes, c + r0 * bytes, y + r0);
  });
}

}  // namespace ftcore
