// The one TORCH_LIBRARY(ftcore): every op's schema, declared once. Kernels register per device in cpu/ and
// cuda/; fake (meta) impls and autograd formulas register from Python (ftcore/_fake.py, ftcore/_autograd.py).
//
// This file also makes ftcore/_C.abi3.so an importable Python module (importing it runs the registrations above)
// that reports what it was built with, so `import ftcore` can refuse a build made for another torch. It uses only
// CPython's limited API (Py_LIMITED_API, set by setup.py) and nothing of libtorch_python: one build loads into
// every Python from 3.10 on, so an extension built here runs under another machine's Python with the same torch.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ftcore/cpu_isa.h"

#define FTCORE_STR2(x) #x
#define FTCORE_STR(x) FTCORE_STR2(x)

TORCH_LIBRARY(ftcore, m) {
  // Sparse delta Δ of a logical out×in weight: sorted flat row-major `indices` (int32/int64) and `values`.
  // dvalues[t] = Σ_n grad_output[n, row t] · input[n, col t], accumulated in fp32 (fp64 for float64 inputs).
  m.def("sparse_delta_grad(Tensor grad_output, Tensor input, Tensor indices) -> Tensor");
  // input · Δᵀ for Δ of shape out_features × input.size(-1): the unmerged forward.
  m.def("sparse_delta_linear(Tensor input, Tensor indices, Tensor values, SymInt out_features) -> Tensor");
  // grad_output · Δ for Δ of shape grad_output.size(-1) × in_features: the unmerged input gradient.
  m.def(
      "sparse_delta_linear_transpose(Tensor grad_output, Tensor indices, Tensor values, SymInt in_features) -> "
      "Tensor");
  // weight.flat[i] = (base[t] if base else weight.flat[i]) + alpha · Σ values[t] over the t with indices[t] = i.
  // weight is the 2-D logical out×in view (any strides). alpha = 0 leaves the start value exactly (values unread):
  // with base that is the bit-exact unmerge. Serves merge, unmerge and compose.
  m.def(
      "sparse_delta_scatter_(Tensor(a!) weight, Tensor indices, Tensor values, float alpha, Tensor? base) -> ()");
  // weight.flat[indices] of the 2-D logical out×in view.
  m.def("sparse_delta_gather(Tensor weight, Tensor indices) -> Tensor");
  // The k positions (sorted, int64) with the largest |grad_outputᵀ · input|, and those magnitudes (fp32),
  // skipping `exclude`; rows of the dense gradient are formed chunk_rows at a time (0 picks a size).
  m.def(
      "sparse_delta_topk(Tensor grad_output, Tensor input, int k, Tensor? exclude=None, int chunk_rows=0) -> "
      "(Tensor, Tensor)");

  // Structured blocks: a dense submatrix of a logical out×in weight addressed by a sorted, distinct index of
  // columns (block out × k) or rows (block k × in).
  // input[..., columns]: the compact slice a column block keeps for backward.
  m.def("gather_columns(Tensor input, Tensor columns) -> Tensor");
  // (..., features) zeros with values[..., j] at columns[j]: the adjoint of gather_columns.
  m.def("scatter_columns(Tensor values, Tensor columns, SymInt features) -> Tensor");
  // grad_output[..., rows]ᵀ · input[..., columns] over the tokens (either index optional), in fp32 (fp64 for
  // float64): a block's weight gradient.
  m.def("structured_block_grad(Tensor grad_output, Tensor input, Tensor? rows=None, Tensor? columns=None) -> Tensor");
  // weight[block] = (base if given else weight[block]) + alpha · block, in fp32, rounded once; alpha = 0 leaves
  // the start value exactly (block unread): merge, bit-exact unmerge, adapter switch.
  m.def(
      "structured_block_scatter_(Tensor(a!) weight, Tensor index, Tensor block, float alpha, Tensor? base, "
      "bool rows) -> ()");
  // weight[:, index] (columns) or weight[index, :] (rows), in weight's dtype.
  m.def("structured_block_gather(Tensor weight, Tensor index, bool rows) -> Tensor");
  // Serving without merging: input · weightᵀ + bias, plus for each batch row b with adapter_ids[b] = a >= 0 the
  // block product of adapter a; adapters' indices and blocks are concatenated, split by offsets (A + 1).
  m.def(
      "multi_adapter_linear(Tensor input, Tensor weight, Tensor? bias, Tensor adapter_ids, Tensor index, "
      "Tensor offsets, Tensor blocks, bool rows) -> Tensor");

  // Rotations and quantizers (contract, formulas and the int4 layout in include/ftcore/quant.h).
  // y = scale · H · diag(signs) · x along the last dim (transpose: scale · diag(signs) · Hᵀ · x), H = H_K ⊗ H_P.
  m.def("hadamard_transform(Tensor input, Tensor? hadamard_k, Tensor? signs, float scale, bool transpose) -> Tensor");
  // (x̂, scale, zero_point): fake quantization by groups of the last dim (group_size -1 whole tensor, 0 per row);
  // a given scale (learnable, symmetric) is used as is.
  m.def(
      "fake_quantize(Tensor input, Tensor? scale, int bits, bool symmetric, int group_size, float clip_ratio) -> "
      "(Tensor, Tensor, Tensor)");
  // (d input, d scale): the straight-through gradient, and the LSQ scale gradient when scale_grad (else empty).
  m.def(
      "fake_quantize_backward(Tensor grad, Tensor input, Tensor scale, Tensor zero_point, int bits, bool symmetric, "
      "int group_size, bool scale_grad) -> (Tensor, Tensor)");
  // (x̂, scale, zero_point, mask): fake_quantize(hadamard_transform(x)) per token or group in one pass; the
  // rotated tensor is never stored. mask holds the straight-through bits (uint8 (rows, ceil(n/8)), bit b of
  // byte j for element 8j + b, 1 inside the range): all that backward needs of the forward.
  m.def(
      "rotate_fake_quantize(Tensor input, Tensor? hadamard_k, Tensor? signs, float scale, int bits, bool symmetric, "
      "int group_size, float clip_ratio) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its input gradient: the transposed rotation of the masked gradient, one pass.
  m.def(
      "rotate_fake_quantize_backward(Tensor grad, Tensor mask, Tensor? hadamard_k, Tensor? signs, float scale) -> "
      "Tensor");
  // (packed, scale, zero_point) of a 2-D weight at 4 bits, rounding exactly as fake_quantize does.
  m.def("quantize_int4(Tensor weight, int group_size, bool symmetric, float clip_ratio) -> (Tensor, Tensor, Tensor)");
  m.def("pack_int4(Tensor codes) -> Tensor");
  m.def("unpack_int4(Tensor packed) -> Tensor");
  m.def(
      "dequantize_int4(Tensor packed, Tensor scale, Tensor zero_point, int group_size, ScalarType dtype) -> Tensor");
  // input · dequant(W)ᵀ + bias, the weight dequantized a block at a time (never whole).
  m.def(
      "int4_linear(Tensor input, Tensor packed, Tensor scale, Tensor zero_point, int group_size, Tensor? bias) -> "
      "Tensor");
}

namespace {

// The in-place ops write their first argument (declared Tensor(a!)). A C++ kernel does not tell autograd, so
// this ADInplaceOrView kernel bumps the written tensor's version counter (shared with every view of it) after
// the write: a weight saved for backward and rewritten before it makes backward raise ("modified by an
// inplace operation") instead of computing a gradient from the new values.
void bump_version_of_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::Tensor written = (*stack)[stack->size() - op.schema().arguments().size()].toTensor();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  written.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(ftcore, ADInplaceOrView, m) {
  m.impl("sparse_delta_scatter_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_written>());
  m.impl("structured_block_scatter_", torch::CppFunction::makeFromBoxedFunction<&bump_version_of_written>());
}

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ftcore::cpu_isa().c_str()); }

PyObject* py_available_cpu_isas(PyObject*, PyObject*) {
  const auto names = ftcore::available_cpu_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (!list) return nullptr;
  for (size_t i = 0; i < names.size(); ++i)
    PyList_SetItem(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(names[i].c_str()));
  return list;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (!name) return nullptr;
  return PyBool_FromLong(ftcore::set_cpu_isa(name));
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The instruction-set build of the CPU kernels in use."},
    {"available_cpu_isas", py_available_cpu_isas, METH_NOARGS, "Builds of the CPU kernels this CPU runs."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Switch the CPU kernels to the named build; False if unsupported."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ftcore compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  PyModule_AddStringConstant(m, "torch_version", FTCORE_STR(FTCORE_TORCH_VERSION));
  PyModule_AddIntConstant(m, "cuda_kernels", FTCORE_WITH_CUDA);
  return m;
}
