"""Autograd formulas of the differentiable ops. The three sparse-delta products are closed under
differentiation (each one's gradients are the other two), as are gather_columns / scatter_columns and the
Hadamard transform (its gradient is its transpose), so double backward works too. The quantizers' gradients are
straight-through estimators computed by their *_backward ops (first order only). The sparse-delta setups save only what the gradients that will be asked for need.
multi_adapter_linear (serving) and the in-place scatters have none. The op table (_op_table.py) registers each
formula for its op."""

import torch

ops = torch.ops.ftcore


def _save(ctx, inputs, needed_by):
    """Saves inputs[i] when some input j in needed_by[i] requires grad; None otherwise."""
    ctx.save_for_backward(
        *(t if any(inputs[j].requires_grad for j in needed_by.get(i, ())) else None for i, t in enumerate(inputs))
    )


# dvalues = sparse_delta_grad(G, X, I):  dG = X · Dᵀ,  dX = G · D   (D holds dvalues at I)
def grad_setup(ctx, inputs, output):
    grad_output, input, indices = inputs
    _save(ctx, (grad_output, input, indices), {0: (1,), 1: (0,), 2: (0, 1)})
    ctx.out_features, ctx.in_features = grad_output.shape[-1], input.shape[-1]


def grad_backward(ctx, dvalues):
    grad_output, input, indices = ctx.saved_tensors
    d_grad_output = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad_output = ops.sparse_delta_linear(input, indices, dvalues, ctx.out_features)
    if ctx.needs_input_grad[1]:
        d_input = ops.sparse_delta_linear_transpose(grad_output, indices, dvalues, ctx.in_features)
    return d_grad_output, d_input, None


# Y = sparse_delta_linear(X, I, V):  dX = dY · Δ,  dV = sparse_delta_grad(dY, X)
def linear_setup(ctx, inputs, output):
    input, indices, values, _ = inputs
    _save(ctx, (input, indices, values), {0: (2,), 1: (0, 2), 2: (0,)})
    ctx.in_features, ctx.values_dtype = input.shape[-1], values.dtype


def linear_backward(ctx, dy):
    input, indices, values = ctx.saved_tensors
    d_input = d_values = None
    if ctx.needs_input_grad[0]:
        d_input = ops.sparse_delta_linear_transpose(dy, indices, values, ctx.in_features)
    if ctx.needs_input_grad[2]:
        d_values = ops.sparse_delta_grad(dy, input, indices).to(ctx.values_dtype)
    return d_input, None, d_values, None


# Z = sparse_delta_linear_transpose(G, I, V):  dG = dZ · Δᵀ,  dV = sparse_delta_grad(G, dZ)
def transpose_setup(ctx, inputs, output):
    grad_output, indices, values, _ = inputs
    _save(ctx, (grad_output, indices, values), {0: (2,), 1: (0, 2), 2: (0,)})
    ctx.out_features, ctx.values_dtype = grad_output.shape[-1], values.dtype


def transpose_backward(ctx, dz):
    grad_output, indices, values = ctx.saved_tensors
    d_grad_output = d_values = None
    if ctx.needs_input_grad[0]:
        d_grad_output = ops.sparse_delta_linear(dz, indices, values, ctx.out_features)
    if ctx.needs_input_grad[2]:
        d_values = ops.sparse_delta_grad(grad_output, dz, indices).to(ctx.values_dtype)
    return d_grad_output, None, d_values, None


# v = sparse_delta_gather(W, I):  dW = zeros with dv added at I (dense, as a weight gradient is; index_add keeps
# it differentiable for double backward)
def gather_setup(ctx, inputs, output):
    weight, indices = inputs
    ctx.save_for_backward(indices)
    ctx.weight_shape = weight.shape


def gather_backward(ctx, dvalues):
    (indices,) = ctx.saved_tensors
    flat = dvalues.new_zeros(ctx.weight_shape.numel()).index_add(0, indices.long(), dvalues)
    return flat.view(ctx.weight_shape), None


# y = gather_columns(x, S):  dx = scatter_columns(dy, S, in)   (and the other way round)
def gather_columns_setup(ctx, inputs, output):
    input, columns = inputs
    ctx.save_for_backward(columns)
    ctx.features = input.shape[-1]


def gather_columns_backward(ctx, dy):
    (columns,) = ctx.saved_tensors
    return ops.scatter_columns(dy, columns, ctx.features), None


def scatter_columns_setup(ctx, inputs, output):
    _, columns, _ = inputs
    ctx.save_for_backward(columns)


def scatter_columns_backward(ctx, dy):
    (columns,) = ctx.saved_tensors
    return ops.gather_columns(dy, columns), None, None


# B = structured_block_grad(G, X, R, S) = G[:, R]ᵀ X[:, S]:  dG[:, R] = X[:, S] · dBᵀ,  dX[:, S] = G[:, R] · dB
def block_grad_setup(ctx, inputs, output):
    grad_output, input, rows, columns = inputs
    ctx.save_for_backward(grad_output, input, rows, columns)


def block_grad_backward(ctx, d_block):
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
def block_gather_setup(ctx, inputs, output):
    weight, index, rows = inputs
    ctx.save_for_backward(index)
    ctx.weight_shape, ctx.rows = weight.shape, rows


def block_gather_backward(ctx, d_block):
    (index,) = ctx.saved_tensors
    d_weight = d_block.new_zeros(ctx.weight_shape).index_copy(0 if ctx.rows else 1, index.long(), d_block)
    return d_weight, None, None


# y = hadamard_transform(x, transpose=t):  dx = hadamard_transform(dy, transpose=not t)  (closed: any order)
def hadamard_setup(ctx, inputs, output):
    _, hadamard_k, signs, scale, transpose = inputs
    ctx.save_for_backward(hadamard_k, signs)
    ctx.scale, ctx.transpose = scale, transpose


def hadamard_backward(ctx, dy):
    hadamard_k, signs = ctx.saved_tensors
    return ops.hadamard_transform(dy, hadamard_k, signs, ctx.scale, not ctx.transpose), None, None, None, None


# (x̂, scale, zero) = fake_quantize(x, scale?):  straight-through dx, LSQ dscale for a given scale
def fake_quantize_setup(ctx, inputs, output):
    input, scale, bits, symmetric, group_size, _ = inputs
    _, qscale, zero = output
    ctx.mark_non_differentiable(qscale, zero)
    ctx.save_for_backward(input, qscale, zero)
    ctx.args = (bits, symmetric, group_size)


def fake_quantize_backward(ctx, dy, _d_scale, _d_zero):
    input, qscale, zero = ctx.saved_tensors
    want_scale = ctx.needs_input_grad[1]
    d_input, d_scale = ops.fake_quantize_backward(dy, input, qscale, zero, *ctx.args, want_scale)
    return d_input, (d_scale if want_scale else None), None, None, None, None


# (x̂, qscale, zero, mask) = rotate_fake_quantize(x):  dx = transposed rotation of mask ⊙ dx̂ (only the bits saved)
def rotate_fake_quantize_setup(ctx, inputs, output):
    _, hadamard_k, signs, scale, *_ = inputs
    _, qscale, zero, mask = output
    ctx.mark_non_differentiable(qscale, zero, mask)
    ctx.save_for_backward(mask, hadamard_k, signs)
    ctx.scale = scale


def rotate_fake_quantize_backward(ctx, dy, _d_scale, _d_zero, _d_mask):
    mask, hadamard_k, signs = ctx.saved_tensors
    d_input = ops.rotate_fake_quantize_backward(dy, mask, hadamard_k, signs, ctx.scale)
    return d_input, None, None, None, None, None, None, None


# (loss, nll, d_hidden, d_weight) = linear_cross_entropy(...): the gradients are computed in the forward (the
# logits never exist whole, so there is nothing to recompute them from), and backward scales them by the loss's
# incoming gradient. The per-token nll and the gradients themselves are not differentiable outputs.
def linear_cross_entropy_setup(ctx, inputs, output):
    _, nll, d_hidden, d_weight = output
    ctx.save_for_backward(d_hidden, d_weight)
    ctx.asked = inputs[8], inputs[9]  # grad_hidden, grad_weight
    ctx.mark_non_differentiable(nll, d_hidden, d_weight)


def linear_cross_entropy_backward(ctx, d_loss, *_):
    d_hidden, d_weight = ctx.saved_tensors
    grads = [None] * 11
    for i, (saved, asked, name) in enumerate(((d_hidden, ctx.asked[0], "hidden"), (d_weight, ctx.asked[1], "weight"))):
        if ctx.needs_input_grad[i]:
            if not asked:
                raise RuntimeError(
                    f"linear_cross_entropy: a gradient for {name} was asked in backward but the forward ran with "
                    f"grad_{name}=False (call it through ftcore.ops.linear_cross_entropy)"
                )
            grads[i] = (saved * d_loss).to(saved.dtype)
    return tuple(grads)
