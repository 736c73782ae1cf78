// linear_cross_entropy's driver, written once against ATen for both devices (contract and formulas in
// include/ftcore/linear_cross_entropy.h). Per chunk of tokens: one GEMM for the logits, the row kernels (cpu/,
// cuda/) for the logsumexp and the in-place gradient, and with gradients one GEMM each for d_hidden and d_weight.
// A chunk holds about 2^25 logits (128 MiB in fp32), so the (tokens × vocab) logits never exist whole. Nothing
// here waits for the device: every per-chunk scalar (the token count, TALR's running maximum) stays a tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ftcore/checks.h"
#include "ftcore/linear_cross_entropy.h"
#include "ftcore/shapes.h"

namespace ftcore {

namespace {

enum class Weighting { None, Given, Dft, Talr };

Weighting parse_weighting(c10::string_view name, const char* op) {
  if (name == "none") return Weighting::None;
  if (name == "given") return Weighting::Given;
  if (name == "dft") return Weighting::Dft;
  if (name == "talr") return Weighting::Talr;
  TORCH_CHECK_VALUE(false, op, ": weighting must be \"none\", \"given\", \"dft\" or \"talr\", got \"",
                    std::string(name), "\"");
}

at::Tensor row_logsumexp(const at::Tensor& rows) {
#if FTCORE_WITH_CUDA
  if (rows.is_cuda()) return lce_row_logsumexp_cuda(rows);
#endif
  return lce_row_logsumexp_cpu(rows);
}

void softmax_grad_rows(const at::Tensor& rows, const at::Tensor& lse, const at::Tensor& coef,
                       const at::Tensor& labels) {
#if FTCORE_WITH_CUDA
  if (rows.is_cuda()) return lce_softmax_grad_rows_cuda(rows, lse, coef, labels);
#endif
  lce_softmax_grad_rows_cpu(rows, lse, coef, labels);
}

// Each counted token's weight before any normalisation (TALR's are normalised by the caller).
at::Tensor token_weight(Weighting weighting, const at::Tensor& nll, const at::Tensor& valid,
                        const at::Tensor& given, double tau) {
  switch (weighting) {
    case Weighting::None: return valid.to(nll.scalar_type());
    case Weighting::Given: return at::where(valid, given, 0.0);
    case Weighting::Dft: return at::where(valid, at::exp(-nll), 0.0);
    case Weighting::Talr: break;
  }
  TORCH_INTERNAL_ASSERT(false, "token_weight: TALR is normalised over the call");
  return {};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& token_weights, int64_t ignore_index, c10::string_view weighting_name,
    double tau, double divisor, bool grad_hidden, bool grad_weight, int64_t chunk_tokens) {
  constexpr const char* op = "linear_cross_entropy";
  const Weighting weighting = parse_weighting(weighting_name, op);
  check_floating(hidden, op, "hidden");
  check_min_dim(hidden, 1, op, "hidden");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": lm_head_weight must be 2-D (vocab, hidden), got shape ",
                    weight.sizes());
  check_same_dtype(weight, hidden, op, "lm_head_weight", "hidden");
  check_same_device(weight, hidden, op, "lm_head_weight", "hidden");
  const int64_t features = hidden.size(-1), vocab = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == features, op, ": lm_head_weight is ", weight.sizes(),
                    " but hidden's last dim is ", features);
  TORCH_CHECK_VALUE(vocab > 0, op, ": lm_head_weight has no rows");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
                   ": labels must be int64 or int32, got ", labels.scalar_type());
  check_same_device(labels, hidden, op, "labels", "hidden");
  TORCH_CHECK_VALUE(labels.sizes() == hidden.sizes().slice(0, hidden.dim() - 1), op, ": labels have shape ",
                    labels.sizes(), " but hidden's leading dims are ", hidden.sizes().slice(0, hidden.dim() - 1));
  TORCH_CHECK_VALUE(token_weights.has_value() == (weighting == Weighting::Given), op,
                    weighting == Weighting::Given ? ": weighting=\"given\" needs token_weights"
                                                  : ": token_weights are only read with weighting=\"given\"");
  if (token_weights) {
    check_floating(*token_weights, op, "token_weights");
    check_same_device(*token_weights, hidden, op, "token_weights", "hidden");
    TORCH_CHECK_VALUE(token_weights->sizes() == labels.sizes(), op, ": token_weights have shape ",
                      token_weights->sizes(), " but labels have ", labels.sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", tau);
  TORCH_CHECK_VALUE(std::isfinite(divisor) && divisor >= 0, op,
                    ": divisor must be >= 0 (0: the number of counted tokens), got ", divisor);
  TORCH_CHECK_VALUE(chunk_tokens >= 0, op, ": chunk_tokens must be >= 0 (0 picks a size), got ", chunk_tokens);

  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The row kernels' dtype: the accumulation type on the CPU, the logits' own dtype on CUDA.
  const auto row_dtype = hidden.is_cuda() ? hidden.scalar_type() : acc;
  const int64_t tokens = labels.numel();
  const auto x = as_rows(hidden);
  const auto y = labels.reshape({-1}).to(at::kLong);
  const auto valid = y.ne(ignore_index);
  const auto opts = hidden.options().dtype(acc);
  const auto count = valid.sum().to(acc);
  const auto div = divisor > 0 ? at::full({}, divisor, opts) : count;
  const auto div_safe = at::where(div > 0, div, 1.0);  // coefficients only: with no counted token all are 0
  const auto given = token_weights ? token_weights->reshape({-1}).to(acc) : at::Tensor();
  const auto one_hot_labels = at::where(valid, y, -1);  // ignored tokens get no one-hot term
  const auto picked_labels = at::where(valid, y, 0);    // an out-of-range label makes the gather raise

  auto nll = at::zeros({tokens}, opts);
  auto d_hidden = grad_hidden ? at::empty({tokens, features}, hidden.options()) : at::empty({0}, hidden.options());
  const auto weight_acc = weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf
                              ? at::kFloat
                              : weight.scalar_type();
  auto d_weight = grad_weight ? at::zeros({vocab, features}, weight.options().dtype(weight_acc))
                              : at::empty({0}, weight.options());
  const bool grads = grad_hidden || grad_weight;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto running_max = at::full({}, neg_inf, opts);  // TALR: the largest log p / tau so far
  std::vector<at::Tensor> chunk_max;

  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(tokens, chunk_tokens > 0 ? chunk_tokens : (int64_t(1) << 25) / vocab));
  for (int64_t s = 0; s < tokens; s += chunk) {
    const int64_t len = std::min(chunk, tokens - s);
    const auto xc = x.narrow(0, s, len);
    const auto vc = valid.narrow(0, s, len);
    auto rows = at::mm(xc, weight.t());
    if (rows.scalar_type() != row_dtype) rows = rows.to(row_dtype);
    rows = rows.contiguous();
    const auto lse = row_logsumexp(rows);
    const auto picked = rows.gather(1, picked_labels.narrow(0, s, len).unsqueeze(1)).squeeze(1).to(acc);
    const auto nll_c = at::where(vc, lse - picked, 0.0);
    nll.narrow(0, s, len).copy_(nll_c);
    if (!grads) continue;

    at::Tensor coef;
    if (weighting == Weighting::Talr) {
      // w_t ∝ exp(a_t), a_t = −nll_t / tau = log p_t / tau, taken relative to the running maximum so that
      // nothing underflows; what was accumulated relative to an older maximum is rescaled when it rises.
      const auto a = at::where(vc, nll_c * (-1.0 / tau), neg_inf);
      const auto new_max = at::maximum(running_max, a.max());
      if (grad_weight) d_weight.mul_(at::where(new_max == neg_inf, 1.0, at::exp(running_max - new_max)));
      coef = at::where(vc, at::exp(a - new_max), 0.0);
      running_max = new_max;
      chunk_max.push_back(new_max);
    } else {
      coef = token_weight(weighting, nll_c, vc, given.defined() ? given.narrow(0, s, len) : given, tau) / div_safe;
    }
    softmax_grad_rows(rows, lse.to(row_dtype == acc ? acc : at::kFloat).contiguous(),
                      coef.to(row_dtype == acc ? acc : at::kFloat).contiguous(),
                      one_hot_labels.narrow(0, s, len).contiguous());
    const auto g = rows.scalar_type() == hidden.scalar_type() ? rows : rows.to(hidden.scalar_type());
    if (grad_hidden) {
      auto out = d_hidden.narrow(0, s, len);
      at::mm_out(out, g, weight);
    }
    if (grad_weight) {
      if (d_weight.scalar_type() == g.scalar_type()) {
        d_weight.addmm_(g.t(), xc);
      } else {
        d_weight.add_(at::mm(g.t(), xc));
      }
    }
  }

  at::Tensor w;
  if (weighting == Weighting::Talr) {
    const auto a = at::where(valid, nll * (-1.0 / tau), neg_inf);
    w = at::where(valid, at::softmax(a, 0) * count, 0.0);  // mean weight 1 over the counted tokens
    if (grads) {
      const auto z = at::where(valid, at::exp(a - running_max), 0.0).sum();
      const auto scale = count / (at::clamp_min(z, 1e-30) * div_safe);
      if (grad_weight) d_weight.mul_(scale);
      if (grad_hidden) {
        int64_t c = 0;
        for (int64_t s = 0; s < tokens; s += chunk, ++c) {
          const auto m = chunk_max[c];
          d_hidden.narrow(0, s, std::min(chunk, tokens - s))
              .mul_(at::where(m == neg_inf, 0.0, at::exp(m - running_max)) * scale);
        }
      }
    }
  } else {
    w = token_weight(weighting, nll, valid, given, tau);
  }
  const auto loss = (w * nll).sum() / div;
  if (grad_weight && d_weight.scalar_type() != weight.scalar_type()) d_weight = d_weight.to(weight.scalar_type());
  if (grad_hidden) d_hidden = d_hidden.view(hidden.sizes());
  return {loss, nll.view(labels.sizes()), d_hidden, d_weight};
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }
#if FTCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(ftcore, CUDA, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }
#endif

}  // namespace ftcore
