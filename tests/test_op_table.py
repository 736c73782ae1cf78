"""Walks the op table (ftcore/_op_table.py): for every op, each part it must have, its reference, opcheck, the
fake tensor, and float64 gradcheck where it is differentiable. Every test is parametrised by op name, so an op
missing a piece fails by name. Also: nothing in the package calls torch.ops.ftcore outside the ops layer."""

import ast
import inspect
import pathlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ftcore
from ftcore import _op_table, ops
from ftcore._op_table import EXACT, STRAIGHT_THROUGH, TABLE

from op_samples import SAMPLES

REPO = pathlib.Path(__file__).resolve().parent.parent
NAMES = [op.name for op in TABLE]
DIFFERENTIABLE = [op.name for op in TABLE if op.gradient is not None]  # the others: test_parts checks they say so


def _samples(op, dtype):
    if op.name not in SAMPLES:
        pytest.fail(f"{op.name}: no sample call in tests/op_samples.py")
    return SAMPLES[op.name](dtype)


def _clone(args, requires_grad=()):
    return tuple(
        a.detach().clone().requires_grad_(i in requires_grad) if isinstance(a, torch.Tensor) else a
        for i, a in enumerate(args)
    )


def _positions(op, names):
    arguments = [a.name for a in op.parsed.arguments]
    return tuple(arguments.index(n) for n in names)


def _results(op, args, out):
    """What a call produced: its outputs, or for an in-place op the arguments it wrote."""
    if op.mutates:
        return tuple(args[i] for i in _positions(op, op.mutates))
    return out if isinstance(out, tuple) else (out,)


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _close(name, got, want):
    assert len(got) == len(want), f"{name}: {len(got)} outputs, the reference gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name} output {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if g.is_floating_point():
            tol = TOLERANCE[g.dtype]
            torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol, msg=lambda m: f"{name} output {i}: {m}")
        else:
            assert torch.equal(g, w), f"{name} output {i} differs from the reference"


def test_the_table_is_every_op():
    registered = sorted(n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ftcore::"))
    assert registered == sorted(NAMES)
    assert sorted(ftcore.check_registrations("CPU")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parts(name):
    op = _op_table.BY_NAME[name]
    assert op.doc and op.schema.startswith("(") and "->" in op.schema, f"{name}: schema and doc"
    arguments = [a.name for a in op.parsed.arguments]
    ref_params = list(inspect.signature(op.reference).parameters)
    assert len(ref_params) == len(arguments), f"{name}: the reference takes {ref_params}, the schema {arguments}"
    fake_params = inspect.signature(op.fake).parameters
    assert any(p.kind == p.VAR_POSITIONAL for p in fake_params.values()) or len(fake_params) == len(arguments), (
        f"{name}: the fake takes {list(fake_params)}, the schema {arguments}"
    )
    for key in ("CPU", "CUDA"):
        source = REPO / op.kernels[key]
        assert source.is_file(), f"{name}: {op.kernels[key]} does not exist"
        assert f'm.impl("{name}"' in source.read_text(), f"{name}: no {key} kernel registered in {op.kernels[key]}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, "CPU"), f"{name}: no CPU kernel"
    if op.mutates:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, "ADInplaceOrView"), f"{name}: writes are not tracked"
    assert (op.gradient is None) == (op.autograd is None) == (not op.grads), f"{name}: gradient, formula and grads disagree"
    if op.gradient == STRAIGHT_THROUGH:
        assert f"{name}_backward" in _op_table.BY_NAME, f"{name}: its estimator's op is not in the table"
    if not name.endswith("_backward"):
        wrapper = getattr(ops, name, None)
        assert wrapper is not None and wrapper.op is op, f"{name}: no wrapper in ftcore.ops bound with @wraps_op"
        assert op.schema in wrapper.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_reference(name):
    op = _op_table.BY_NAME[name]
    kernel = getattr(torch.ops.ftcore, name).default
    for args in _samples(op, torch.float64):
        mine, theirs = _clone(args), _clone(args)
        got = _results(op, mine, kernel(*mine))
        want = _results(op, theirs, op.reference(*theirs))
        _close(name, got, want)


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name):
    op = _op_table.BY_NAME[name]
    kernel = getattr(torch.ops.ftcore, name).default
    for args in _samples(op, torch.float32):
        grads = _positions(op, op.grads) if op.gradient else ()
        torch.library.opcheck(kernel, _clone(args, grads))


@pytest.mark.parametrize("name", NAMES)
def test_fake(name):
    op = _op_table.BY_NAME[name]
    kernel = getattr(torch.ops.ftcore, name).default
    for args in _samples(op, torch.float32):
        real = _results(op, _clone(args), kernel(*_clone(args)))
        mode = FakeTensorMode(allow_non_fake_inputs=False)
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _clone(args))
        with mode:
            fake = _results(op, fake_args, kernel(*fake_args))
        assert len(fake) == len(real)
        for i, (f, r) in enumerate(zip(fake, real)):
            assert f.shape == r.shape and f.dtype == r.dtype, f"{name} output {i}: fake {f.shape} {f.dtype}, real {r.shape} {r.dtype}"


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradient(name):
    op = _op_table.BY_NAME[name]
    kernel = getattr(torch.ops.ftcore, name).default
    grads = _positions(op, op.grads)
    for args in _samples(op, torch.float64):
        differentiable = tuple(i for i in grads if isinstance(args[i], torch.Tensor))
        if op.gradient == EXACT:

            def f(*leaves, args=args, differentiable=differentiable):
                call = list(args)
                for i, leaf in zip(differentiable, leaves):
                    call[i] = leaf
                return kernel(*call)

            leaves = tuple(args[i].detach().clone().requires_grad_() for i in differentiable)
            assert torch.autograd.gradcheck(f, leaves), name
        else:  # the straight-through estimator is its *_backward op, checked against its reference above
            call = _clone(args, differentiable)
            out = kernel(*call)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
            for i in differentiable:
                assert call[i].grad is not None and call[i].grad.shape == call[i].shape, f"{name}: no gradient for {i}"


OPS_LAYER = {"ops.py", "_autograd.py"}


def _calls_to_compiled_ops(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "ftcore"
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ops"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "torch"
        ):
            yield node.lineno


def test_compiled_ops_are_called_only_from_the_ops_layer():
    package = REPO / "ftcore"
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted(package.rglob("*.py"))
        if path.name not in OPS_LAYER or path.parent != package
        for line in _calls_to_compiled_ops(path)
    ]
    assert not offenders, "torch.ops.ftcore called outside ftcore/ops.py and ftcore/_autograd.py: " + ", ".join(offenders)
    assert list(_calls_to_compiled_ops(package / "ops.py")), "the check itself finds nothing: it is broken"


# ---- the validation policy -------------------------------------------------------------------------------------


def test_kernels_guard_memory_when_validation_is_skipped():
    """A raw op call, or a wrapper told checked=True, with a bad index raises in the kernel: never a read or
    write out of bounds (on the CPU the guard sits in the pass that reads the indices)."""
    w, x, g = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, 4)
    far, unsorted, negative = torch.tensor([1, 20]), torch.tensor([7, 2]), torch.tensor([-1, 3])
    raw = torch.ops.ftcore
    calls = {
        "gather": lambda i: raw.sparse_delta_gather(w, i),
        "scatter": lambda i: raw.sparse_delta_scatter_(w.clone(), i, torch.ones(2), 1.0, None),
        "grad": lambda i: raw.sparse_delta_grad(g, x, i),
        "linear": lambda i: raw.sparse_delta_linear(x, i, torch.ones(2), 4),
        "transpose": lambda i: raw.sparse_delta_linear_transpose(g, i, torch.ones(2), 5),
        "wrapper, checked": lambda i: ops.sparse_delta_linear(x, i, torch.ones(2), 4, checked=True),
    }
    for what, call in calls.items():
        for bad in (far, negative) + ((unsorted,) if what != "gather" else ()):
            with pytest.raises(IndexError, match="holds an entry that is not"):
                call(bad)
    block_calls = {
        "gather_columns": lambda i: raw.gather_columns(x, i),
        "scatter_columns": lambda i: raw.scatter_columns(torch.randn(3, 2), i, 5),
        "block gather": lambda i: raw.structured_block_gather(w, i, False),
        "block scatter": lambda i: raw.structured_block_scatter_(w.clone(), i, torch.randn(4, 2), 1.0, None, False),
        "block grad": lambda i: ops.structured_block_grad(g, x, None, i, checked=True),
    }
    for what, call in block_calls.items():
        for bad in (torch.tensor([1, 5]), torch.tensor([-1, 2]), torch.tensor([3, 3]), torch.tensor([3, 1])):
            with pytest.raises(IndexError, match="holds an entry that is not strictly increasing and in range"):
                call(bad)


def test_int32_positions_of_a_weight_past_2_31_entries():
    """The limit is compared in Python: it need not fit the index dtype."""
    ops.check_delta_indices(torch.tensor([1, 5], dtype=torch.int32), 2**31 + 10, strict=True)
    ops.check_delta_indices(torch.tensor([1, 2**31 - 1], dtype=torch.int32), 2**33)
    with pytest.raises(IndexError, match=r"indices\[1\] = 9 is out of range \[0, 9\)"):
        ops.check_delta_indices(torch.tensor([1, 9], dtype=torch.int32), 9)


def test_wrappers_validate_on_every_device_the_same_way():
    """The wrappers check index values through the one entry point, with the entry named (CPU here; the same
    code runs for CUDA tensors)."""
    x = torch.randn(3, 5)
    with pytest.raises(IndexError, match=r"indices\[1\] = 20 is out of range \[0, 20\)"):
        ops.sparse_delta_linear(x, torch.tensor([1, 20]), torch.ones(2), 4)
    with pytest.raises(ValueError, match=r"indices must be sorted .* indices\[0\] = 7 and indices\[1\] = 2"):
        ops.sparse_delta_gather(torch.randn(4, 5), torch.tensor([7, 2]))
    with pytest.raises(ValueError, match="index of adapter 1 must be strictly increasing"):
        ops.multi_adapter_linear(torch.randn(2, 5), torch.randn(4, 5), None, torch.tensor([0, 1]),
                                 torch.tensor([0, 3, 3]), torch.tensor([0, 1, 3]), torch.randn(4, 3))


@pytest.mark.parametrize("kind", ["sparse", "structured"])
def test_a_loaded_index_is_validated_before_anything_is_written(kind):
    torch.manual_seed(0)
    if kind == "sparse":
        layer = ftcore.SparseDeltaLinear(torch.nn.Linear(5, 4), torch.tensor([1, 6, 8]))
        name, bad = "indices", torch.tensor([1, 6, 20], dtype=layer.indices.dtype)
    else:
        layer = ftcore.StructuredSparseLinear(torch.nn.Linear(5, 4), torch.tensor([0, 2]))
        name, bad = "index", torch.tensor([2, 2], dtype=layer.index.dtype)
    with torch.no_grad():
        layer.delta.add_(1.0)
    layer(torch.randn(2, 5))  # merged
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state[name] = bad
    state["base_layer.weight"] = torch.randn(4, 5)
    with pytest.raises(ValueError, match=f"{name}: the state dict's"):
        layer.load_state_dict(state)
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a refused load"
