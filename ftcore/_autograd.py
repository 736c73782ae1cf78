"""Autograd formulas of the differentiable ops. The three sparse-delta products are closed under
differentiation (each one's gradients are the other two), as are gather_columns / scatter_columns, so double
backward works too. The sparse-delta setups save only what the gradients that will be asked for need.
multi_adapter_linear (serving) and the in-place scatters have none."""

import torch

ops = torch.ops.ftcore


def _save(ctx, inputs, needed_by):
    """Saves inputs[i] when some input j in needed_by[i] requires grad; None otherwise."""
    ctx.save_for_backward(
        *(t if any(inputs[j].requires_grad for j in needed_by.get(i, ())) else None for i, t in enumerate(inputs))
    )


# dvalues = sparse_delta_grad(G, X, I):  dG = X · Dᵀ,  dX = G · D   (D holds dvalues at I)
def _grad_setup(ctx, inputs, output):
    grad_output, input, indices = inputs
    _save(ctx, (grad_output, input, indices), {0: (1,), 1: (0,), 2: (0, 1)})
    ctx.out_features, ctx.in_features = grad_output.shape[-1], input.shape[-1]


def _grad_backward(ctx, dvalues):
    grad_output, input, indices = ctx.saved_tensors
    d_grad_output = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad_output = ops.sparse_delta_linear(input, indices, dvalues, ctx.out_features)
    if ctx.needs_input_grad[1]:
        d_input = ops.sparse_delta_linear_transpose(grad_output, indices, dvalues, ctx.in_features)
    return d_grad_output, d_input, None


# Y = sparse_delta_linear(X, I, V):  dX = dY · Δ,  dV = sparse_delta_grad(dY, X)
def _linear_setup(ctx, inputs, output):
    input, indices, values, _ = inputs
    _save(ctx, (input, indices, values), {0: (2,), 1: (0, 2), 2: (0,)})
    ctx.in_features, ctx.values_dtype = input.shape[-1], values.dtype


def _linear_backward(ctx, dy):
    input, indices, values = ctx.saved_tensors
    d_input = d_values = None
    if ctx.needs_input_grad[0]:
        d_input = ops.sparse_delta_linear_transpose(dy, indices, values, ctx.in_features)
    if ctx.needs_input_grad[2]:
        d_values = ops.sparse_delta_grad(dy, input, indices).to(ctx.values_dtype)
    return d_input, None, d_values, None


# Z = sparse_delta_linear_transpose(G, I, V):  dG = dZ · Δᵀ,  dV = sparse_delta_grad(G, dZ)
def _transpose_setup(ctx, inputs, output):
    grad_output, indices, values, _ = inputs
    _save(ctx, (grad_output, indices, values), {0: (2,), 1: (0, 2), 2: (0,)})
    ctx.out_features, ctx.values_dtype = grad_output.shape[-1], values.dtype


def _transpose_backward(ctx, dz):
    grad_output, indices, values = ctx.saved_tensors
    d_grad_output = d_values = None
    if ctx.needs_input_grad[0]:
        d_grad_output = ops.sparse_delta_linear(dz, indices, values, ctx.out_features)
    if ctx.needs_input_grad[2]:
        d_values = ops.sparse_delta_grad(grad_output, dz, indices).to(ctx.values_dtype)
    return d_grad_output, None, d_values, None


# v = sparse_delta_gather(W, I):  dW = zeros with dv added at I (dense, as a weight gradient is; index_add keeps
# it differentiable for double backward)
def _gather_setup(ctx, inputs, output):
    weight, indices = inputs
    ctx.save_for_backward(indices)
    ctx.weight_shape = weight.shape


def _gather_backward(ctx, dvalues):
    (indices,) = ctx.saved_tensors
    flat = dvalues.new_zeros(ctx.weight_shape.numel()).index_add(0, indices.long(), dvalues)
    return flat.view(ctx.weight_shape), None


# y = gather_columns(x, S):  dx = scatter_columns(dy, S, in)   (and the other way round)
def _gather_columns_setup(ctx, inputs, output):
    input, columns = inputs
    ctx.save_for_backward(columns)
    ctx.features = input.shape[-1]


def _gather_columns_backward(ctx, dy):
    (columns,) = ctx.saved_tensors
    return ops.scatter_columns(dy, columns, ctx.features), None


def _scatter_columns_setup(ctx, inputs, output):
    _, columns, _ = inputs
    ctx.save_for_backward(columns)


def _scatter_columns_backward(ctx, dy):
    (columns,) = ctx.saved_tensors
    return ops.gather_columns(dy, columns), None, None


# B = structured_block_grad(G, X, R, S) = G[:, R]ᵀ X[:, S]:  dG[:, R] = X[:, S] · dBᵀ,  dX[:, S] = G[:, R] · dB
def _block_grad_setup(ctx, inputs, output):
    grad_output, input, rows, columns = inputs
    ctx.save_for_backward(grad_output, input, rows, columns)


def _block_grad_backward(ctx, d_block):
    grad_output, input, rows, columns = ctx.saved_tensors
    g = grad_output if rows is None else ops.gather_columns(grad_output, rows)
    x = input if columns is None else ops.gather_columns(input, columns)
    d_grad_output = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad_output = torch.matmul(x.to(d_block.dtype), d_block.t()).to(grad_output.dtype)
        if rows is not None:
            d_grad_output = ops.scatter_columns(d_grad_output, rows, grad_output.shape[-1])
    if ctx.needs_input_grad[1]:
        d_input = torch.matmul(g.to(d_block.dtype), d_block).to(input.dtype)
        if columns is not None:
            d_input = ops.scatter_columns(d_input, columns, input.shape[-1])
    return d_grad_output, d_input, None, None


# block = structured_block_gather(W, I):  dW = zeros with dblock copied in at the block
def _block_gather_setup(ctx, inputs, output):
    weight, index, rows = inputs
    ctx.save_for_backward(index)
    ctx.weight_shape, ctx.rows = weight.shape, rows


def _block_gather_backward(ctx, d_block):
    (index,) = ctx.saved_tensors
    d_weight = d_block.new_zeros(ctx.weight_shape).index_copy(0 if ctx.rows else 1, index.long(), d_block)
    return d_weight, None, None


torch.library.register_autograd("ftcore::sparse_delta_grad", _grad_backward, setup_context=_grad_setup)
torch.library.register_autograd("ftcore::sparse_delta_linear", _linear_backward, setup_context=_linear_setup)
torch.library.register_autograd(
    "ftcore::sparse_delta_linear_transpose", _transpose_backward, setup_context=_transpose_setup
)
torch.library.register_autograd("ftcore::sparse_delta_gather", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("ftcore::gather_columns", _gather_columns_backward, setup_context=_gather_columns_setup)
torch.library.register_autograd("ftcore::scatter_columns", _scatter_columns_backward, setup_context=_scatter_columns_setup)
torch.library.register_autograd("ftcore::structured_block_grad", _block_grad_backward, setup_context=_block_grad_setup)
torch.library.register_autograd(
    "ftcore::structured_block_gather", _block_gather_backward, setup_context=_block_gather_setup
)
