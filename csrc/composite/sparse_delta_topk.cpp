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
#include "ftcore/shapes.h"
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
  if (exclude) {  // checked on any device: this op synchronises anyway, once per call
    check_indices(*exclude, input, op, "exclude");
    excl = exclude->to(at::kLong).contiguous();
    if (excl.numel() > 0) {
      const int64_t lo = excl.min().item<int64_t>(), hi = excl.max().item<int64_t>();
      TORCH_CHECK_INDEX(lo >= 0 && hi < numel, op, ": exclude holds ", lo < 0 ? lo : hi,
                        ", out of range for a weight with ", numel, " entries");
      TORCH_CHECK_VALUE(excl.numel() < 2 || (excl.slice(0, 1) >= excl.slice(0, 0, -1)).all().item<bool>(), op,
                        ": exclude must be sorted (non-decreasing)");
      excluded = std::get<0>(at::unique_consecutive(excl)).numel();
    }
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= numel - excluded, op, ": k must be in [0, ", numel - excluded,
                    "] (the positions of a ", out, "x", in, " weight not excluded), got ", k);
  const auto opts_long = input.options().dtype(at::kLong);
  if (k == 0) return {at::empty({0}, opts_long), at::empty({0}, input.options().dtype(at::kFloat))};

  // About 2^22 gradient entries (16 MB of scores) a chunk: enough rows for the GEMM to run at full speed
  // (narrower chunks measured up to 2x slower), small beside the weights this is used on.
  const int64_t rows = chunk_rows > 0 ? std::min(chunk_rows, out) : std::clamp<int64_t>((1 << 22) / in, 1, out);
  // Scores are formed in fp32 like the reference (half overflows at 65504, bf16 ties far too often), so
  // 16-bit inputs are widened once: an activation-sized copy, still nothing of weight size.
  const auto G32 = G.to(at::kFloat), X32 = X.to(at::kFloat);
  // Where each chunk's excluded positions start and end, for all chunks at once (one copy to the host).
  std::vector<int64_t> excl_bounds;
  if (excl.defined() && excl.numel() > 0) {
    auto starts = at::arange(0, out + rows, rows, opts_long).clamp_max_(out).mul_(in);
    auto bounds = at::searchsorted(excl, starts).cpu();
    excl_bounds.assign(bounds.data_ptr<int64_t>(), bounds.data_ptr<int64_t>() + bounds.numel());
  }
  at::Tensor best_scores = at::empty({0}, input.options().dtype(at::kFloat));
  at::Tensor best_index = at::empty({0}, opts_long);
  for (int64_t r0 = 0, chunk = 0; r0 < out; r0 += rows, ++chunk) {
    const int64_t r1 = std::min(out, r0 + rows);
    auto scores = at::mm(G32.narrow(1, r0, r1 - r0).t(), X32).abs_().view(-1);  // rows × in of |GᵀX|
    if (!excl_bounds.empty() && excl_bounds[chunk + 1] > excl_bounds[chunk])
      scores.index_fill_(0, excl.slice(0, excl_bounds[chunk], excl_bounds[chunk + 1]) - r0 * in, -1.0f);
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
