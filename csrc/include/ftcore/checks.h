// Argument checks shared by the CPU and CUDA kernels. No CUDA headers here.
// Every failure names the op and the argument, and raises the Python exception that fits:
// TypeError for a wrong dtype, ValueError for a wrong shape or device, IndexError for an index out of range.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace ftcore {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(
      st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
      op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_index_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
      op, ": ", name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b, " is on ",
                    b.device());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                             const char* name_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(), " but ", name_b,
                   " is ", b.scalar_type(), "; pass both in one dtype");
}

inline void check_min_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= dim, op, ": ", name, " must have at least ", dim, " dims, got shape ", t.sizes());
}

// The CPU kernels' memory guard, the counterpart of the CUDA kernels' device-side assert. Index values are
// validated, with the offending entry named, where they are set (ftcore/_validate.py: the public wrappers, the
// modules at construction and load), so no kernel re-validates them on every call; each kernel only tests the
// indices it reads, inside the pass that reads them, and raises through this instead of touching memory out of
// bounds. An in-place op may have written the entries before the bad one, as on CUDA.
[[noreturn]] inline void fail_index_guard(const char* op, const char* name, const char* expected) {
  TORCH_CHECK_INDEX(false, op, ": ", name, " holds an entry that is not ", expected,
                    "; validate indices with ftcore.ops.check_delta_indices (the ftcore.ops wrappers do)");
}

// Guard of a block index (a block's rows or columns, k at most a weight dim): strictly increasing within
// [0, limit). A repeat would be written twice (a race between threads, or the last write winning over a sum).
template <typename index_t>
void guard_block_index(const index_t* p, int64_t k, int64_t limit, const char* op, const char* name) {
  bool ok = true;
  for (int64_t t = 0; t < k; ++t)
    ok &= p[t] >= 0 && static_cast<int64_t>(p[t]) < limit && (t == 0 || p[t - 1] < p[t]);
  if (!ok) fail_index_guard(op, name, "strictly increasing and in range");
}

}  // namespace ftcore
