// Inner loops of the CPU kernels of every op family (panels for the sparse deltas, rotations, quantizers),
// compiled once per instruction set (kernels_*.cpp) and picked at load time (cpu/cpu_isa.cpp). Plain C++ on raw
// pointers: these translation units include no ATen header, so code compiled for AVX-512 can never leak into a
// generic build through an inline function the linker merges.
//
// The loops work on *panels*: a chunk of `count` tokens of a tokens × features matrix, stored transposed as
// features × width in the accumulation type (float, or double for float64 data), tokens past `count` zeroed.
// Transposing a chunk once makes every per-entry product a dot or axpy over contiguous memory, so the k
// entries of a delta cost k·width multiply-adds on data that stays in cache.
#pragma once

#include <cstdint>

namespace ftcore::cpu {

enum class Elem : int32_t { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

// A tokens × features matrix with element strides (row = token).
struct StridedMatrix {
  void* data;
  Elem elem;
  int64_t row_stride;
  int64_t col_stride;
};

// The k entries of a delta arranged by group: group g (a row of Δ, or a column) owns positions
// [group_ptr[g], group_ptr[g+1]); position p pairs with panel row operand[p] (the entry's column for row
// groups, its row for column groups) and, for products, has value values[p] (accumulation dtype).
// Prepared once per op call, so the inner loops never divide and can prefetch operand rows ahead.
struct EntryGroups {
  const int64_t* group_ptr;
  const int32_t* operand;
  const void* values;
};

struct Kernels {
  const char* name;
  // panel[f * width + n] = m[n0 + n, f] for f in [f0, f1), n < count; zero for count <= n < width.
  void (*load_panel)(const StridedMatrix& m, int64_t n0, int64_t count, int64_t f0, int64_t f1, void* panel,
                     int64_t width);
  // m[n0 + n, f] = panel[f * width + n] (rounded to m's dtype) for f in [f0, f1), n < count.
  void (*store_panel)(const void* panel, int64_t width, int64_t count, int64_t f0, int64_t f1,
                      const StridedMatrix& m, int64_t n0);
  // out[p] += <group_panel[g], operand_panel[operand[p]]> for the positions p of groups [g0, g1).
  void (*dot_groups)(Elem acc, const void* group_panel, const void* operand_panel, int64_t width,
                     const EntryGroups& entries, int64_t g0, int64_t g1, void* out);
  // dst_panel[g] = sum over positions p of group g of values[p] * operand_panel[operand[p]], g in [g0, g1).
  void (*group_sums)(Elem acc, const void* operand_panel, int64_t width, const EntryGroups& entries, int64_t g0,
                     int64_t g1, void* dst_panel);

  // Rotations (contract in include/ftcore/quant.h), on rows held in the accumulation type.
  // In place: the Sylvester (fast Walsh–Hadamard) transform of each of `count` consecutive segments of length
  // p, a power of two.
  void (*fwht)(Elem acc, void* buf, int64_t p, int64_t count);
  // out (k × p) = h · in (k × p), or hᵀ · in when `transpose`; h is k × k row-major float (±1).
  void (*hadamard_mix)(Elem acc, const float* h, int64_t k, bool transpose, const void* in, int64_t p, void* out);

  // Quantizers (formulas in include/ftcore/quant.h) on len values in the accumulation type.
  // lo = min, hi = max of v; or hi = max |v| when symmetric (lo untouched).
  void (*group_range)(Elem acc, const void* v, int64_t len, bool symmetric, float* lo, float* hi);
  // In place: v = (clamp(round(v / scale) + zero, qmin, qmax) - zero) · scale. With `bits` (a row's packed
  // mask, element i in bit i % 8 of byte i / 8), sets the bits of elements [bit0, bit0 + len) to whether the
  // level was within [qmin, qmax].
  void (*fake_quant)(Elem acc, void* v, int64_t len, float scale, float zero, float qmin, float qmax,
                     uint8_t* bits, int64_t bit0);
  // In place on g: zero where round(v / scale) + zero falls outside [qmin, qmax] (the straight-through mask).
  void (*ste_mask)(Elem acc, const void* v, int64_t len, float scale, float zero, float qmin, float qmax, void* g);
  // In place on g: zero where the bit of the packed mask (element i in bit i % 8 of byte i / 8) is 0.
  void (*apply_mask_bits)(Elem acc, void* g, int64_t len, const uint8_t* bits);

  // Linear cross-entropy (include/ftcore/linear_cross_entropy.h), on `rows` contiguous rows of `vocab` logits in
  // the accumulation type. lse[r] = log Σ_j exp(logits[r, j]), NaN when the row holds a NaN or an infinity.
  void (*row_logsumexp)(Elem acc, const void* logits, int64_t vocab, int64_t rows, void* lse);
  // In place: logits[r, j] = coef[r] · (exp(logits[r, j] − lse[r]) − [j == labels[r]]): the logits' gradient
  // of coef[r] · nll_r. A row with coef 0 is zeroed; a label outside [0, vocab) (an ignored token) adds no
  // one-hot term, so no label is ever used as an address unchecked.
  void (*softmax_grad_rows)(Elem acc, void* logits, int64_t vocab, int64_t rows, const void* lse, const void* coef,
                            const int64_t* labels);

  // int4 weights (layout in include/ftcore/quant.h): y[b · y_stride + r] = Σ_c dequant(W)[r, c] · x[b, c] for the
  // m input rows and the weight rows [r0, r1). xs holds the input rows in float: `blocked` (needs in % 128 == 0
  // and group_size % 8 == 0) in the layout int4_gemv_input_layout describes, otherwise as they are.
  void (*int4_gemv)(const uint8_t* packed, const float* scale, const uint8_t* zero, int64_t in, int64_t group_size,
                    bool blocked, const float* xs, int64_t m, int64_t r0, int64_t r1, float* y, int64_t y_stride);
};

// The blocked input layout of int4_gemv: xs[b · in + 128·blk + 16·s + w] = x[b, 128·blk + 8·w + s] (w < 16, s < 8),
// the order the nibbles of 64 packed bytes come out of one 16-lane word vector.
constexpr int64_t kInt4GemvBlock = 128;

// Panel widths (tokens per chunk) the inner loops are compiled for: compile-time widths let the compiler keep
// a whole panel row in registers.
constexpr int64_t kPanelWidths[] = {32, 64, 128, 256};

// AVX2 and AVX-512 builds need GCC's per-file target pragma; other compilers get the generic build only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FTCORE_CPU_MULTI_ISA 1
#else
#define FTCORE_CPU_MULTI_ISA 0
#endif

// The build in use (see cpu_isa.h).
const Kernels& active_kernels();

const Kernels& kernels_generic();
#if FTCORE_CPU_MULTI_ISA
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace ftcore::cpu
