// The ops' schemas, fakes and autograd formulas are declared once, in the op table (ftcore/_op_table.py), which
// defines them when `import ftcore` loads this extension. Kernels register per device in cpu/, cuda/ and
// composite/ (TORCH_LIBRARY_IMPL may run before the schema exists; the dispatcher checks them against it when
// the table defines it). This file holds the one kernel the table asks for by name: the version-counter bump of
// an argument a schema marks written.
//
// This file also makes ftcore/_C.abi3.so an importable Python module (importing it runs the kernels' registrations)
// that reports what it was built with, so `import ftcore` can refuse a build made for another torch. It uses only
// CPython's limited API (Py_LIMITED_API, set by setup.py) and nothing of libtorch_python: one build loads into
// every Python from 3.10 on, so an extension built here runs under another machine's Python with the same torch.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "ftcore/cpu_isa.h"
#include "ftcore/quant.h"

#define FTCORE_STR2(x) #x
#define FTCORE_STR(x) FTCORE_STR2(x)

namespace {

// The in-place ops write arguments their schema marks Tensor(a!). A C++ kernel does not tell autograd, so this
// ADInplaceOrView kernel bumps each written tensor's version counter (shared with every view of it) after the
// write: a weight saved for backward and rewritten before it makes backward raise ("modified by an inplace
// operation") instead of computing a gradient from the new values.
void bump_version_of_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i)
    if (arguments[i].alias_info() && arguments[i].alias_info()->isWrite())
      written.push_back((*stack)[first + i].toTensor());
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : written) t.unsafeGetTensorImpl()->bump_version();
}

// The bump kernels of the ops the table registers, for the process's lifetime.
torch::Library& write_tracking() {
  static torch::Library library(torch::Library::IMPL, "ftcore", c10::DispatchKey::ADInplaceOrView, __FILE__,
                                __LINE__);
  return library;
}

PyObject* py_bump_version_after_write(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (!name) return nullptr;
  try {
    write_tracking().impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_version_of_written>());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

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

PyObject* py_rotation_row_storage(PyObject*, PyObject* args) {
  long long n, k, acc_bytes, static_bytes, optin_bytes;
  if (!PyArg_ParseTuple(args, "LLLLL", &n, &k, &acc_bytes, &static_bytes, &optin_bytes)) return nullptr;
  const auto where = ftcore::rotation_row_storage(n, k, acc_bytes, static_bytes, optin_bytes);
  return PyUnicode_FromString(where == ftcore::RowStorage::Shared ? "shared" : "global");
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The instruction-set build of the CPU kernels in use."},
    {"available_cpu_isas", py_available_cpu_isas, METH_NOARGS, "Builds of the CPU kernels this CPU runs."},
    {"bump_version_after_write", py_bump_version_after_write, METH_O,
     "Registers the version-counter bump of the written argument for the named in-place op."},
    {"rotation_row_storage", py_rotation_row_storage, METH_VARARGS,
     "rotation_row_storage(n, k, acc_bytes, static_smem_bytes, optin_smem_bytes): 'shared' or 'global', where "
     "the CUDA rotation kernels keep a row of n values (Hadamard factor k) on a device with that opt-in limit."},
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
