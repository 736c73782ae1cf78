// linear_cross_entropy: the loss of a linear head (an LM head) over its targets without the tokens × vocab
// logits ever existing whole. The driver (composite/linear_cross_entropy.cpp, one for both devices) walks the
// tokens a chunk at a time: logits = x_c · Wᵀ (the vendor GEMM), each row's logsumexp, then the rows rewritten in
// place as their gradient coef · (softmax − onehot), which two more GEMMs turn into d_hidden = G · W and
// d_weight += Gᵀ · x_c. The gradient is computed in the forward (3 GEMMs a chunk, 2 when the weight is frozen,
// 1 without gradients); backward only scales it by the loss's incoming gradient.
//
// The loss is Σ_t w_t · nll_t / divisor over the tokens whose label is not ignore_index, w_t by `weighting`:
//   none   w_t = 1
//   given  w_t = token_weights[t] (any sign: negative weights push a token's probability down)
//   dft    w_t = p(y_t), not differentiated (Dynamic Fine-Tuning)
//   talr   w_t = N · softmax_t(log p(y_t) / tau) over the call's N counted tokens, not differentiated
//          (Token-Adaptive Loss Reweighting: w_t ∝ p(y_t)^(1/tau), mean weight 1)
// divisor > 0 is used as is (`num_items_in_batch`, or 1 for a sum); divisor = 0 means the counted tokens.
//
// The row kernels below are the per-device parts. Rows are contiguous, in the accumulation type on the CPU
// (float or double; bf16/fp16 logits are widened first) and in the logits' dtype on CUDA (fp32 arithmetic).
#pragma once

#include <ATen/core/Tensor.h>

namespace ftcore {

// (rows) logsumexp of each row of `logits` (rows × vocab), in the accumulation type; NaN for a row holding a NaN
// or an infinity.
at::Tensor lce_row_logsumexp_cpu(const at::Tensor& logits);
// In place: logits[r, j] = coef[r] · (exp(logits[r, j] − lse[r]) − [j == labels[r]]); rows with coef 0 zeroed; a
// label outside [0, vocab) adds no one-hot term. lse and coef in the accumulation type, labels int64.
void lce_softmax_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& coef,
                               const at::Tensor& labels);
#if FTCORE_WITH_CUDA
at::Tensor lce_row_logsumexp_cuda(const at::Tensor& logits);
void lce_softmax_grad_rows_cuda(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& coef,
                                const at::Tensor& labels);
#endif

}  // namespace ftcore
