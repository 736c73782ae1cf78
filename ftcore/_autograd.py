"""Autograd formulas of the differentiable ops. The three sparse-delta products are closed under
differentiation (each one's gradients are the other two), so double backward works too. Each setup_context
saves only what the gradients that will be asked for need."""

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


torch.library.register_autograd("ftcore::sparse_delta_grad", _grad_backward, setup_context=_grad_setup)
torch.library.register_autograd("ftcore::sparse_delta_linear", _linear_backward, setup_context=_linear_setup)
torch.library.register_autograd(
    "ftcore::sparse_delta_linear_transpose", _transpose_backward, setup_context=_transpose_setup
)
torch.library.register_autograd("ftcore::sparse_delta_gather", _gather_backward, setup_context=_gather_setup)
