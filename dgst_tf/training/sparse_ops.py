"""Convolution, dense and ReLU ops whose backward pass does only the work the MCU does.

Each op is an ordinary forward computation wrapped in ``tf.custom_gradient``; its backward:
- returns the input gradient only if ``input_grad`` (layers before the first updated layer
  need none, so backpropagation stops there);
- computes the weight gradient only for the selected input channels ``selection``, from the
  selected slice of the input activation, which is the only activation the op keeps. It is
  scattered into a full-shape kernel gradient (zeros elsewhere) so any optimizer can apply
  it, unless a ``kept_slot`` is given: a tensor of the kept kernel's shape (conv
  ``[kh, kw, k, C_out]``, dense ``[k, out]``) whose gradient is then the selected channels'
  kernel gradient, with none for the kernel, so no full-shape gradient is ever built
  (`kept_kernel_shape`, `scatter_kept_grad`);
- skips the weight gradient entirely when ``active`` is False (dynamic layer choice);
- computes the bias gradient only if ``bias_grad``;
- with an activation ``pattern`` (`dgst_tf.training.activation_patterns`, spatial patterns
  only), keeps only the pattern's pixels of the selected slice and estimates the weight
  gradient from them (``pattern=None`` or "full": exact).

Nothing here knows Keras layers; `dgst_tf.training.sparse_model` binds these ops to them.

    y = sparse_conv2d(x, kernel, bias, strides=(1, 1), padding="SAME",
                      selection=tf.constant([0, 3]), input_grad=False)
    # the tape gives d loss / d slot = the kernel gradient of channels 0 and 3 only
    slot = tf.zeros(kept_kernel_shape(kernel.shape, 2))
    y = sparse_conv2d(x, kernel, bias, strides=(1, 1), padding="SAME",
                      selection=tf.constant([0, 3]), kept_slot=slot)
"""
from dgst_tf.core.keras_compat import tf
from dgst_tf.training import activation_patterns


def _channel_scatter(values, indices, full_shape, axis):
    """Scatter ``values`` (selected channels along ``axis``) into zeros of ``full_shape``."""
    rank = len(full_shape)
    perm = [axis] + [i for i in range(rank) if i != axis]
    inverse = [perm.index(i) for i in range(rank)]
    moved = tf.transpose(values, perm)
    shape = [full_shape[i] for i in perm]
    return tf.transpose(tf.scatter_nd(indices[:, None], moved, shape), inverse)


def kept_kernel_shape(kernel_shape, kept: int) -> list:
    """The shape of ``kept`` input channels' slice of a kernel (axis 2 of a conv or depthwise
    kernel, axis 0 of a dense one).

        kept_kernel_shape([1, 1, 64, 384], 7)    # [1, 1, 7, 384]
    """
    shape = list(kernel_shape)
    shape[0 if len(shape) == 2 else 2] = kept
    return shape


def scatter_kept_grad(kept_grad, selection, full_shape):
    """The full-shape kernel gradient from the selected channels' gradient ``kept_grad``
    (zeros elsewhere), as the ops build it without a ``kept_slot``.

        scatter_kept_grad(tf.ones([1, 1, 2, 3]), tf.constant([0, 3]), [1, 1, 4, 3])
    """
    if len(full_shape) == 2:
        return tf.scatter_nd(selection[:, None], kept_grad, full_shape)
    return _channel_scatter(kept_grad, selection, full_shape, axis=2)


def _op_inputs(kernel, kept_slot, bias) -> list:
    return [kernel] + ([] if kept_slot is None else [kept_slot]) + (
        [] if bias is None else [bias])


def _split_extra(extra, has_slot: bool, has_bias: bool):
    """(kept_slot, bias) from a custom-gradient op's inputs after x and kernel."""
    extra = list(extra)
    slot = extra.pop(0) if has_slot else None
    return slot, (extra.pop(0) if has_bias else None)


def _kernel_grads(compute_kept, selection, active, full_shape, slot_shape, dtype):
    """(kernel gradient, kept_slot gradient): the selected channels' kernel gradient
    ``compute_kept()`` goes to the slot when there is one (``slot_shape``), else scattered to
    the kernel's full shape; zeros when ``active`` is False."""
    if selection is None:
        return None, None
    if slot_shape is not None:
        return None, _weight_grad(compute_kept, active, slot_shape, dtype)
    return _weight_grad(lambda: scatter_kept_grad(compute_kept(), selection, full_shape),
                        active, full_shape, dtype), None


def _grads_out(dx, dk, dslot, db, has_slot: bool, has_bias: bool) -> tuple:
    return (dx, dk) + ((dslot,) if has_slot else ()) + ((db,) if has_bias else ())


def _stored_pattern(pattern, kernel_size, strides, padding, dilations):
    """(pattern, geometry) for a non-trivial spatial pattern, else None."""
    if pattern is None:
        return None
    pattern = activation_patterns.get_pattern(pattern)
    if pattern.channel_block:
        raise ValueError(f"activation pattern {pattern.name!r} drops channels; the sparse "
                         "update chooses channels itself (use a spatial pattern)")
    if pattern.is_full:
        return None
    return pattern, activation_patterns.ConvGeometry.of(kernel_size, strides, padding,
                                                         dilations)


def _pattern_weight_grad(stored, dy, stored_pattern, kernel_shape, depthwise=False):
    pattern, geometry = stored_pattern
    return activation_patterns.weight_gradient_from_stored(
        stored, dy, pattern, geometry, kernel_shape, kernel_shape[2], depthwise=depthwise)


def _weight_grad(compute, active, full_shape, dtype):
    if active is None:
        return compute()
    return tf.cond(active, compute, lambda: tf.zeros(full_shape, dtype))


def sparse_conv2d(x, kernel, bias=None, *, strides, padding, dilations=(1, 1),
                  selection=None, active=None, input_grad=True, bias_grad=False,
                  pattern=None, kept_slot=None):
    """Conv2D (NHWC, HWIO kernel) with the sparse backward described in the module doc."""
    strides4 = [1, strides[0], strides[1], 1]
    dilations4 = [1, dilations[0], dilations[1], 1]
    full_shape = kernel.shape.as_list()
    stored_pattern = _stored_pattern(pattern, full_shape[:2], strides, padding, dilations)
    has_slot, has_bias = kept_slot is not None, bias is not None
    slot_shape = kept_slot.shape.as_list() if has_slot else None

    @tf.custom_gradient
    def op(x, kernel, *extra):
        _, bias = _split_extra(extra, has_slot, has_bias)
        y = tf.nn.conv2d(x, kernel, strides4, padding, dilations=dilations4)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        kept = tf.gather(x, selection, axis=3) if selection is not None else None
        if kept is not None and stored_pattern is not None:
            kept = activation_patterns.store_for_conv(kept, *stored_pattern)  # pixels kept
        x_shape = tf.shape(x)

        def grad(dy):
            dx = (_conv2d_input_grad(x_shape, kernel, dy, full_shape, strides4, padding,
                                     dilations4) if input_grad else None)
            dk, dslot = _kernel_grads(lambda: _conv2d_kernel_grad(
                kept, full_shape, dy, selection, stored_pattern, strides4, padding,
                dilations4), selection, active, full_shape, slot_shape, dy.dtype)
            db = tf.reduce_sum(dy, axis=[0, 1, 2]) if (bias_grad and has_bias) else None
            return _grads_out(dx, dk, dslot, db, has_slot, has_bias)

        return y, grad

    return op(x, *_op_inputs(kernel, kept_slot, bias))


def _is_pointwise(kernel_shape, strides4, dilations4) -> bool:
    return list(kernel_shape[:2]) == [1, 1] and strides4 == dilations4 == [1, 1, 1, 1]


def _conv2d_input_grad(x_shape, kernel, dy, full_shape, strides4, padding, dilations4):
    """The input gradient of a Conv2D. A pointwise conv's is one matmul ``dy W^T`` over the
    pixels (the same sums as TF's Conv2DBackpropInput up to float rounding, which at batch 1
    on the small maps of a network's last blocks takes about 1.6x as long)."""
    if _is_pointwise(full_shape, strides4, dilations4):
        rows = tf.matmul(tf.reshape(dy, [-1, full_shape[3]]),
                         tf.reshape(kernel, full_shape[2:]), transpose_b=True)
        return tf.reshape(rows, x_shape)
    return tf.raw_ops.Conv2DBackpropInput(
        input_sizes=x_shape, filter=kernel, out_backprop=dy, strides=strides4,
        padding=padding, dilations=dilations4)


def _conv2d_kernel_grad(kept, full_shape, dy, selection, stored_pattern, strides4, padding,
                        dilations4):
    """The kernel gradient of a Conv2D's selected input channels [kh, kw, k, C_out], from
    their stored input ``kept``."""
    if stored_pattern is not None:
        shape = [*full_shape[:2], int(selection.shape[0]), full_shape[3]]
        return _pattern_weight_grad(kept, dy, stored_pattern, shape)
    if full_shape[:2] == [1, 1] and strides4 != [1, 1, 1, 1]:
        return _strided_pointwise_kernel_grad(kept, dy, strides4)
    if _is_pointwise(full_shape, strides4, dilations4):
        # a pointwise conv's filter gradient is one matmul x^T dy over the pixels; TF's
        # filter-gradient op takes a slow path for the odd channel counts a selection has
        k = int(selection.shape[0])
        rows = tf.matmul(tf.reshape(kept, [-1, k]), tf.reshape(dy, [-1, full_shape[3]]),
                         transpose_a=True)
        return tf.reshape(rows, [1, 1, k, full_shape[3]])
    k = tf.shape(selection)[0]
    sizes = tf.stack([full_shape[0], full_shape[1], k, full_shape[3]])
    return tf.raw_ops.Conv2DBackpropFilter(
        input=kept, filter_sizes=sizes, out_backprop=dy, strides=strides4,
        padding=padding, dilations=dilations4)


def _strided_pointwise_kernel_grad(kept, dy, strides4):
    """The kernel gradient of a strided 1x1 Conv2D: output pixel (i, j) reads input pixel
    (i * s_h, j * s_w) (no padding for a 1x1 kernel, SAME or VALID), so it is the input
    subsampled times ``dy``. (TensorFlow 2.21's oneDNN Conv2DBackpropFilter corrupts the heap
    for a strided 1x1 kernel on an even-sized input.)"""
    subsampled = kept[:, ::strides4[1], ::strides4[2], :]
    return tf.einsum("nhwc,nhwo->co", subsampled, dy)[None, None]


def sparse_depthwise_conv2d(x, kernel, bias=None, *, strides, padding, dilations=(1, 1),
                            selection=None, active=None, input_grad=True, bias_grad=False,
                            pattern=None, kept_slot=None):
    """DepthwiseConv2D (kernel [K, K, C, multiplier]); ``selection`` picks channels."""
    strides4 = [1, strides[0], strides[1], 1]
    full_shape = kernel.shape.as_list()
    stored_pattern = _stored_pattern(pattern, full_shape[:2], strides, padding, dilations)
    conv = dict(strides4=strides4, padding=padding, dilations=tuple(dilations))
    has_slot, has_bias = kept_slot is not None, bias is not None
    slot_shape = kept_slot.shape.as_list() if has_slot else None

    @tf.custom_gradient
    def op(x, kernel, *extra):
        _, bias = _split_extra(extra, has_slot, has_bias)
        y = tf.nn.depthwise_conv2d(x, kernel, strides4, padding, dilations=dilations)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        kept = tf.gather(x, selection, axis=3) if selection is not None else None
        if kept is not None and stored_pattern is not None:
            kept = activation_patterns.store_for_conv(kept, *stored_pattern)
        x_shape = tf.shape(x)

        def grad(dy):
            dx = _depthwise_input_grad(x, x_shape, kernel, dy, **conv) if input_grad else None
            dk, dslot = _kernel_grads(lambda: _depthwise_kernel_grad(
                kept, kernel, dy, selection, stored_pattern, **conv),
                selection, active, full_shape, slot_shape, dy.dtype)
            db = tf.reduce_sum(dy, axis=[0, 1, 2]) if (bias_grad and has_bias) else None
            return _grads_out(dx, dk, dslot, db, has_slot, has_bias)

        return y, grad

    return op(x, *_op_inputs(kernel, kept_slot, bias))


def _depthwise_input_grad(x, x_shape, kernel, dy, strides4, padding, dilations):
    """The input gradient of a depthwise conv."""
    if dilations != (1, 1):
        # TF's native depthwise input backprop ignores dilations on CPU:
        # differentiate the (space-to-batch) forward op instead
        with tf.GradientTape() as tape:
            tape.watch(x)
            y_again = tf.nn.depthwise_conv2d(x, kernel, strides4, padding, dilations=dilations)
        return tape.gradient(y_again, x, output_gradients=dy)
    return tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
        input_sizes=x_shape, filter=kernel, out_backprop=dy, strides=strides4,
        padding=padding, dilations=[1, dilations[0], dilations[1], 1])


def _depthwise_kernel_grad(kept, kernel, dy, selection, stored_pattern, strides4, padding,
                           dilations):
    """The kernel gradient of a depthwise conv's selected channels [kh, kw, k, multiplier],
    from their stored input ``kept``."""
    full_shape = kernel.shape.as_list()
    multiplier = full_shape[3]
    k = tf.shape(selection)[0]
    out_channels = tf.reshape(
        selection[:, None] * multiplier + tf.range(multiplier)[None, :], [-1])
    dy_kept = tf.gather(dy, out_channels, axis=3)
    if stored_pattern is not None:
        shape = [*full_shape[:2], int(selection.shape[0]), multiplier]
        dk_kept = _pattern_weight_grad(kept, dy_kept, stored_pattern, shape, depthwise=True)
    elif dilations != (1, 1):  # native filter backprop ignores them
        chosen = tf.gather(kernel, selection, axis=2)
        with tf.GradientTape() as tape:
            tape.watch(chosen)
            y_kept = tf.nn.depthwise_conv2d(kept, chosen, strides4, padding, dilations=dilations)
        dk_kept = tape.gradient(y_kept, chosen, output_gradients=dy_kept)
    else:
        sizes = tf.stack([full_shape[0], full_shape[1], k, multiplier])
        dk_kept = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
            input=kept, filter_sizes=sizes, out_backprop=dy_kept, strides=strides4,
            padding=padding, dilations=[1, dilations[0], dilations[1], 1])
    return dk_kept


def sparse_dense(x, kernel, bias=None, *, selection=None, active=None, input_grad=True,
                 bias_grad=False, full_weight_grad=False, kept_slot=None):
    """Dense on [batch, features]; ``selection`` picks input features (rows of the kernel).

    ``full_weight_grad`` gives the whole kernel gradient (the classifier).
    """
    full_shape = kernel.shape.as_list()
    has_slot, has_bias = kept_slot is not None, bias is not None
    slot_shape = kept_slot.shape.as_list() if has_slot else None

    @tf.custom_gradient
    def op(x, kernel, *extra):
        _, bias = _split_extra(extra, has_slot, has_bias)
        y = tf.matmul(x, kernel)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        kept = tf.gather(x, selection, axis=1) if selection is not None else None

        def grad(dy):
            dx = tf.matmul(dy, kernel, transpose_b=True) if input_grad else None
            if full_weight_grad:
                dk, dslot = tf.matmul(x, dy, transpose_a=True), None
            else:
                dk, dslot = _kernel_grads(lambda: tf.matmul(kept, dy, transpose_a=True),
                                          selection, active, full_shape, slot_shape, dy.dtype)
            db = tf.reduce_sum(dy, axis=0) if (bias_grad and has_bias) else None
            return _grads_out(dx, dk, dslot, db, has_slot, has_bias)

        return y, grad

    return op(x, *_op_inputs(kernel, kept_slot, bias))


def relu_with_mask(x, max_value=None):
    """ReLU / ReLU6 whose backward is ``dy`` times the mask ``0 < x < max_value`` (the MCU
    keeps that mask, 1 bit per value).

    ReLU and ReLU6 run as TF's own ops, whose gradients read the output, which the next
    layer keeps anyway: ``y > 0`` (and ``y < 6``) is exactly ``x > 0`` (and ``x < 6``), and
    ``ReluGrad`` / ``Relu6Grad`` multiply ``dy`` by it, bit for bit as ``dy * mask``."""
    if max_value is None:
        return _relu_from_output(x, tf.nn.relu, tf.raw_ops.ReluGrad)
    if max_value == 6.0:
        return _relu_from_output(x, tf.nn.relu6, tf.raw_ops.Relu6Grad)

    @tf.custom_gradient
    def op(x):
        y = tf.clip_by_value(x, 0.0, max_value)
        mask = tf.logical_and(x > 0, x < max_value)

        def grad(dy):
            return dy * tf.cast(mask, dy.dtype)

        return y, grad

    return op(x)


def _relu_from_output(x, forward, backward):
    @tf.custom_gradient
    def op(x):
        y = forward(x)

        def grad(dy):
            return backward(gradients=dy, features=y)

        return y, grad

    return op(x)
