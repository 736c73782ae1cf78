// Inner loops of the CPU sparse-delta kernels, compiled once per instruction set (kernels_*.cpp) and picked at
// load time. Plain C++ on raw pointers: these translation units include no ATen header, so code compiled for
// AVX-512 can never leak into a generic build through an inline function the linker merges.
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

// Which entries a group_sums call adds, and where each entry's operand row sits.
struct EntryGroups {
  const int64_t* group_ptr;  // entries of group g are positions [group_ptr[g], group_ptr[g+1])
  const int64_t* order;      // position p holds entry order[p]; nullptr means entry p
  const void* indices;       // flat positions, int32 or int64
  bool indices_are_int64;
  int64_t in_features;       // row = index / in_features, col = index % in_features
  bool by_row;               // groups are rows (operand = col) or columns (operand = row)
};

struct Kernels {
  const char* name;
  // panel[f * width + n] = m[n0 + n, f] for f in [f0, f1), n < count; zero for count <= n < width.
  void (*load_panel)(const StridedMatrix& m, int64_t n0, int64_t count, int64_t f0, int64_t f1, void* panel,
                     int64_t width);
  // m[n0 + n, f] = panel[f * width + n] (rounded to m's dtype) for f in [f0, f1), n < count.
  void (*store_panel)(const void* panel, int64_t width, int64_t count, int64_t f0, int64_t f1,
                      const StridedMatrix& m, int64_t n0);
  // out[t] += <g_panel[row(t)], x_panel[col(t)]> for t in [t0, t1); acc is Float or Double.
  void (*dot_entries)(Elem acc, const void* g_panel, const void* x_panel, int64_t width, const void* indices,
                      bool indices_are_int64, int64_t in_features, int64_t t0, int64_t t1, void* out);
  // dst_panel[g] = sum over the entries t of group g of values[t] * src_panel[operand(t)], for g in [g0, g1).
  void (*group_sums)(Elem acc, const void* src_panel, int64_t width, const EntryGroups& groups, const void* values,
                     int64_t g0, int64_t g1, void* dst_panel);
};

// Panels are padded to a multiple of this many tokens so the inner loops never need a scalar tail.
constexpr int64_t kPanelAlign = 32;

// AVX2 and AVX-512 builds need GCC's per-file target pragma; other compilers get the generic build only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FTCORE_CPU_MULTI_ISA 1
#else
#define FTCORE_CPU_MULTI_ISA 0
#endif

const Kernels& kernels_generic();
#if FTCORE_CPU_MULTI_ISA
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace ftcore::cpu
