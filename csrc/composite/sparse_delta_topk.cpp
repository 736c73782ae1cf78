// sparse_delta_topk: the k positions of an out×in weight with the largest |grad_outputᵀ · input|, i.e. the
// largest dense weight-gradient entries, without ever holding the dense gradient: rows of it are formed a
// chunk at a time (a GEMM, the right kernel for this work on either device), each chunk's best k are merged
// into the running best k, and positions listed in `exclude` never compete. Memory O(chunk_rows · in + k).
//
// Written once against ATen and registered for both CPU and CUDA: the work is a GEMM plus a selection, and
// the vendor GEMM and ATen's top-k are the fastest kernels there are for those.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ftcore/checks.h"
#include "ftcore/sparse_delta.h"

namespace ftcore {

std::tuple<at::Tensor, at::Tensor> sparse_delta_topk(const at::Tensor& grad_output, const at::Tensor& input,
                                                     int64_t k, const std::optional<at::Tensor>& exclude,
                                                     int64_t chunk_rows) {
  constexpr const char* op = "sparse_delta_topk";
  check_activation_pair(grad_output, input, op);
  const auto G = as_rows(grad_output), X = as_rows(input);
  const int64_t out = G.size(1), in = X.size(1), numel = out * in;
  TORCH_CHECK_VALUE(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0 picks a size), got ", chunk_rows);
  at::Tensor excl;
  int64_t excluded = 0;
  if (exclude) {
    check_indices(*exclude, input, op, "exclude");
    check_index_values(*exclude, numel, op, "exclude");
    excl = exclude->to(at::kLong).contiguous();
    excluded = excl.numel() == 0 ? 0 : std::get<0>(at::unique_consecutive(excl)).numel();
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= numel - excluded, op, ": k must be in [0, ", numel - excluded,
                    "] (the positions of a ", out, "x", in, " weight not excluded), got ", k);
  const auto opts_long = input.options().dtype(at::kLong);
  if (k == 0) return {at::empty({0}, opts_long), at::empty({0}, input.options().dtype(at::kFloat))};

  // About 2^22 gradient entries (16 MB of scores) a chunk: enough rows for the GEMM to run at full speed
  // (narrower chunks measured up to 2x slower), small beside the weights this is used on.
  const int64_t rows = chunk_rows > 0 ? std::min(chunk_rows, out) : std::clamp<int64_t>((1 << 22) / in, 1, out);
  at::Tensor best_scores = at::empty({0}, input.options().dtype(at::kFloat));
  at::Tensor best_index = at::empty({0}, opts_long);
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t r1 = std::min(out, r0 + rows);
    // rows × in block of the dense gradient, in fp32 (computed in the inputs' dtype with fp32 accumulation).
    auto scores = at::mm(G.narrow(1, r0, r1 - r0).t(), X).abs_().to(at::kFloat).view(-1);
    if (excl.defined() && excl.numel() > 0) {
      auto bounds = at::searchsorted(excl, at::tensor({r0 * in, r1 * in}, opts_long));
      auto lo_hi = bounds.cpu();
      const int64_t lo = lo_hi[0].item<int64_t>(), hi = lo_hi[1].item<int64_t>();
      if (hi > lo) scores.index_fill_(0, excl.slice(0, lo, hi) - r0 * in, -1.0f);
    }
    const int64_t take = std::min<int64_t>(k, scores.numel());
    auto [chunk_scores, chunk_pos] = at::topk(scores, take, 0, /*largest=*/true, /*sorted=*/false);
    auto merged_scores = at::cat({best_scores, chunk_scores});
    auto merged_index = at::cat({best_index, chunk_pos + r0 * in});
    const int64_t keep = std::min<int64_t>(k, merged_scores.numel());
    auto [top_scores, top_pos] = at::topk(merged_scores, keep, 0, /*largest=*/true, /*sorted=*/false);
    best_scores = top_scores;
    best_index = merged_index.index_select(0, top_pos);
  }
  auto [sorted_index, order] = at::sort(best_index);
  return {sorted_index, best_scores.index_select(0, order)};
}

TORCH_LIBRARY_IMPL(ftcore, CPU, m) { m.impl("sparse_delta_topk", &sparse_delta_topk); }
#if FTCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(ftcore, CUDA, m) { m.impl("sparse_delta_topk", &sparse_delta_topk); }
#endif

}  // namespace ftcore
