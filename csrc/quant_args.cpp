// Argument checks of the rotation and quantization ops, shared by the CPU and CUDA kernels (one wording).
#include <ATen/ATen.h>

#include "ftcore/checks.h"
#include "ftcore/quant.h"

namespace ftcore {

Grouping check_quant_args(const at::Tensor& x, int64_t bits, int64_t group_size, double clip_ratio, const char* op,
                          const char* name) {
  check_floating(x, op, name);
  check_min_dim(x, 1, op, name);
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, op, ": bits must be in [2, 8], got ", bits);
  TORCH_CHECK_VALUE(clip_ratio > 0.0 && clip_ratio <= 1.0, op, ": clip_ratio must be in (0, 1], got ", clip_ratio);
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(n > 0, op, ": ", name, " must have a non-empty last dim, got shape ", x.sizes());
  const int64_t rows = x.numel() / n;
  TORCH_CHECK_VALUE(group_size >= -1, op, ": group_size must be -1 (whole tensor), 0 (per row) or positive, got ",
                    group_size);
  if (group_size > 0)
    TORCH_CHECK_VALUE(n % group_size == 0, op, ": group_size ", group_size, " must divide the last dim of ", name,
                      " (", n, ")");
  const int64_t g = group_size > 0 ? group_size : n;
  return {rows, n, g, n / g, group_size == -1};
}

void check_scale(const at::Tensor& scale, const at::Tensor& like, const Grouping& g, const char* op,
                 const char* name) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", scale.scalar_type());
  check_same_device(scale, like, op, name, "the data");
  const int64_t rows = g.whole_tensor ? 1 : g.rows, groups = g.whole_tensor ? 1 : g.groups;
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == groups, op, ": ", name,
                    " must have shape (", rows, ", ", groups, ") for this grouping, got ", scale.sizes());
}

int64_t check_hadamard_args(const at::Tensor& x, const std::optional<at::Tensor>& hadamard_k,
                            const std::optional<at::Tensor>& signs, const char* op) {
  check_floating(x, op, "input");
  check_min_dim(x, 1, op, "input");
  const int64_t n = x.size(-1);
  int64_t k = 1;
  if (hadamard_k) {
    const auto& h = *hadamard_k;
    TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, op, ": hadamard_k must be float32, got ", h.scalar_type());
    check_same_device(h, x, op, "hadamard_k", "input");
    TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == h.size(1) && h.size(0) >= 1, op,
                      ": hadamard_k must be a square matrix, got shape ", h.sizes());
    k = h.size(0);
  }
  TORCH_CHECK_VALUE(n >= 1 && n % k == 0, op, ": the last dim of input (", n, ") must be a multiple of K = ", k);
  const int64_t p = n / k;
  TORCH_CHECK_VALUE((p & (p - 1)) == 0, op, ": the last dim of input (", n, ") must be K·2^m for K = ", k,
                    "; got ", n, " = ", k, "·", p);
  if (signs) {
    check_floating(*signs, op, "signs");
    check_same_device(*signs, x, op, "signs", "input");
    TORCH_CHECK_VALUE(signs->dim() == 1 && signs->size(0) == n, op, ": signs must have shape (", n, "), got ",
                      signs->sizes());
  }
  return k;
}

FakeQuantSetup setup_fake_quantize(const at::Tensor& input, const std::optional<at::Tensor>& scale, int64_t bits,
                                   bool symmetric, int64_t group_size, double clip_ratio) {
  constexpr const char* op = "fake_quantize";
  const Grouping g = check_quant_args(input, bits, group_size, clip_ratio, op);
  const int64_t rows = g.whole_tensor ? 1 : g.rows, groups = g.whole_tensor ? 1 : g.groups;
  const auto fopts = input.options().dtype(at::kFloat);
  if (!scale) return {g, at::empty({rows, groups}, fopts), at::zeros({rows, groups}, fopts)};
  TORCH_CHECK_VALUE(symmetric, op, ": a given (learnable) scale needs symmetric quantization");
  check_scale(*scale, input, g, op);
  return {g, scale->contiguous().clone(), at::zeros({rows, groups}, fopts)};
}

void check_grad_like(const at::Tensor& grad, const at::Tensor& input, const char* op) {
  check_floating(grad, op, "grad");
  check_same_dtype(grad, input, op, "grad", "input");
  check_same_device(grad, input, op, "grad", "input");
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes(), op, ": grad ", grad.sizes(), " and input ", input.sizes(),
                    " must have one shape");
}

Grouping check_rotate_quant_args(const at::Tensor& input, const std::optional<at::Tensor>& hadamard_k,
                                 const std::optional<at::Tensor>& signs, int64_t bits, int64_t group_size,
                                 double clip_ratio, int64_t& k) {
  constexpr const char* op = "rotate_fake_quantize";
  k = check_hadamard_args(input, hadamard_k, signs, op);
  TORCH_CHECK_VALUE(group_size >= 0, op, ": group_size must be 0 (per token) or a group length, got ", group_size,
                    " (a whole-tensor scale would need the rotated tensor twice)");
  return check_quant_args(input, bits, group_size, clip_ratio, op);
}

Grouping check_quantize_int4_args(const at::Tensor& weight, int64_t group_size, double clip_ratio) {
  constexpr const char* op = "quantize_int4";
  check_floating(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) % 2 == 0, op,
                    ": weight must be 2-D (out, in) with an even in_features, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(group_size >= 0, op, ": group_size must be 0 (per output channel) or positive, got ",
                    group_size);
  return check_quant_args(weight, 4, group_size, clip_ratio, op, "weight");
}

std::vector<int64_t> check_pack_int4_args(const at::Tensor& codes) {
  constexpr const char* op = "pack_int4";
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  check_min_dim(codes, 1, op, "codes");
  TORCH_CHECK_VALUE(codes.size(-1) % 2 == 0, op, ": the last dim of codes must be even, got shape ", codes.sizes());
  auto sizes = codes.sizes().vec();
  sizes.back() /= 2;
  return sizes;
}

std::vector<int64_t> check_unpack_int4_args(const at::Tensor& packed) {
  constexpr const char* op = "unpack_int4";
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  check_min_dim(packed, 1, op, "packed");
  auto sizes = packed.sizes().vec();
  sizes.back() *= 2;
  return sizes;
}

void check_mask(const at::Tensor& mask, const at::Tensor& grad, const char* op) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, op, ": mask must be uint8, got ", mask.scalar_type());
  check_same_device(mask, grad, op, "mask", "grad");
  const int64_t n = grad.size(-1), rows = n ? grad.numel() / n : 0;
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == (n + 7) / 8, op,
                    ": mask must have shape (", rows, ", ", (n + 7) / 8, ") for grad ", grad.sizes(), ", got ",
                    mask.sizes());
}

int64_t check_int4_args(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                        int64_t group_size, const char* op) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, op, ": packed must be 2-D (out, in/2), got shape ", packed.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_TYPE(zero.scalar_type() == at::kByte, op, ": zero_point must be uint8, got ", zero.scalar_type());
  check_same_device(scale, packed, op, "scale", "packed");
  check_same_device(zero, packed, op, "zero_point", "packed");
  const int64_t out = packed.size(0), in = 2 * packed.size(1);
  TORCH_CHECK_VALUE(group_size >= 0, op, ": group_size must be 0 (per row) or positive, got ", group_size);
  const int64_t g = group_size > 0 ? group_size : in;
  TORCH_CHECK_VALUE(g > 0 && in % g == 0, op, ": group_size ", group_size, " must divide in_features (", in, ")");
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == out && scale.size(1) == in / g, op,
                    ": scale must have shape (", out, ", ", in / g, "), got ", scale.sizes());
  TORCH_CHECK_VALUE(zero.sizes() == scale.sizes(), op, ": zero_point must have shape ", scale.sizes(), ", got ",
                    zero.sizes());
  return g;
}

int64_t rotation_row_bytes(int64_t n, int64_t k, int64_t acc_bytes) { return n * (k > 1 ? 2 : 1) * acc_bytes; }

RowStorage rotation_row_storage(int64_t n, int64_t k, int64_t acc_bytes, int64_t static_smem_bytes,
                                int64_t optin_smem_bytes) {
  return rotation_row_bytes(n, k, acc_bytes) + static_smem_bytes <= optin_smem_bytes ? RowStorage::Shared
                                                                                      : RowStorage::Global;
}

}  // namespace ftcore
