"""Convolution, dense and ReLU ops whose backward pass does only the work the MCU does.

Each op is an ordinary forward computation wrapped in ``tf.custom_gradient``; its backward:
- returns the input gradient only if ``input_grad`` (layers before the first updated layer
  need none, so backpropagation stops there);
- computes the weight gradient only for the selected input channels ``selection``, from the
  selected slice of the input activation, which is the only activation the op keeps
  (it is scattered into a full-shape gradient so any optimizer can apply it, zeros elsewhere);
- skips the weight gradient entirely when ``active`` is False (dynamic layer choice);
- computes the bias gradient only if ``bias_grad``;
- with an activation ``pattern`` (`dgst_tf.training.activation_patterns`, spatial patterns
  only), keeps only the pattern's pixels of the selected slice and estimates the weight
  gradient from them (``pattern=None`` or "full": exact).

Nothing here knows Keras layers; `dgst_tf.training.sparse_model` binds these ops to them.

    y = sparse_conv2d(x, kernel, bias, strides=(1, 1), padding="SAME",
                      selection=tf.constant([0, 3]), input_grad=False)
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
                  pattern=None):
    """Conv2D (NHWC, HWIO kernel) with the sparse backward described in the module doc."""
    strides4 = [1, strides[0], strides[1], 1]
    dilations4 = [1, dilations[0], dilations[1], 1]
    full_shape = kernel.shape.as_list()
    stored_pattern = _stored_pattern(pattern, full_shape[:2], strides, padding, dilations)

    @tf.custom_gradient
    def op(x, kernel, *bias):
        bias = bias[0] if bias else None
        y = tf.nn.conv2d(x, kernel, strides4, padding, dilations=dilations4)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        kept = tf.gather(x, selection, axis=3) if selection is not None else None
        if kept is not None and stored_pattern is not None:
            kept = activation_patterns.store_for_conv(kept, *stored_pattern)  # pixels kept
        x_shape = tf.shape(x)

        def grad(dy):
            dx = (tf.raw_ops.Conv2DBackpropInput(
                input_sizes=x_shape, filter=kernel, out_backprop=dy, strides=strides4,
                padding=padding, dilations=dilations4) if input_grad else None)
            dk = None
            if selection is not None:
                dk = _weight_grad(lambda: _conv2d_kernel_grad(
                    kept, full_shape, dy, selection, stored_pattern, strides4, padding,
                    dilations4), active, full_shape, dy.dtype)
            db = tf.reduce_sum(dy, axis=[0, 1, 2]) if (bias_grad and bias is not None) else None
            return (dx, dk, db) if bias is not None else (dx, dk)

        return y, grad

    return op(x, kernel, *([] if bias is None else [bias]))


def _conv2d_kernel_grad(kept, full_shape, dy, selection, stored_pattern, strides4, padding,
                        dilations4):
    """The full-shape kernel gradient of a Conv2D, from the selected input channels' stored
    input ``kept`` (zeros for the other channels)."""
    if stored_pattern is not None:
        shape = [*full_shape[:2], int(selection.shape[0]), full_shape[3]]
        dk_kept = _pattern_weight_grad(kept, dy, stored_pattern, shape)
    else:
        k = tf.shape(selection)[0]
        sizes = tf.stack([full_shape[0], full_shape[1], k, full_shape[3]])
        dk_kept = tf.raw_ops.Conv2DBackpropFilter(
            input=kept, filter_sizes=sizes, out_backprop=dy, strides=strides4,
            padding=padding, dilations=dilations4)
    return _channel_scatter(dk_kept, selection, full_shape, axis=2)


def sparse_depthwise_conv2d(x, kernel, bias=None, *, strides, padding, dilations=(1, 1),
                            selection=None, active=None, input_grad=True, bias_grad=False,
                            pattern=None):
    """DepthwiseConv2D (kernel [K, K, C, multiplier]); ``selection`` picks channels."""
    strides4 = [1, strides[0], strides[1], 1]
    full_shape = kernel.shape.as_list()
    stored_pattern = _stored_pattern(pattern, full_shape[:2], strides, padding, dilations)
    conv = dict(strides4=strides4, padding=padding, dilations=tuple(dilations))

    @tf.custom_gradient
    def op(x, kernel, *bias):
        bias = bias[0] if bias else None
        y = tf.nn.depthwise_conv2d(x, kernel, strides4, padding, dilations=dilations)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        kept = tf.gather(x, selection, axis=3) if selection is not None else None
        if kept is not None and stored_pattern is not None:
            kept = activation_patterns.store_for_conv(kept, *stored_pattern)
        x_shape = tf.shape(x)

        def grad(dy):
            dx = _depthwise_input_grad(x, x_shape, kernel, dy, **conv) if input_grad else None
            dk = None
            if selection is not None:
                dk = _weight_grad(lambda: _depthwise_kernel_grad(
                    kept, kernel, dy, selection, stored_pattern, **conv),
                    active, full_shape, dy.dtype)
            db = tf.reduce_sum(dy, axis=[0, 1, 2]) if (bias_grad and bias is not None) else None
            return (dx, dk, db) if bias is not None else (dx, dk)

        return y, grad

    return op(x, kernel, *([] if bias is None else [bias]))


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
    """The full-shape kernel gradient of a depthwise conv, from the selected channels'
    stored input ``kept`` (zeros for the other channels)."""
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
    return _channel_scatter(dk_kept, selection, full_shape, axis=2)


def sparse_dense(x, kernel, bias=None, *, selection=None, active=None, input_grad=True,
                 bias_grad=False, full_weight_grad=False):
    """Dense on [batch, features]; ``selection`` picks input features (rows of the kernel).

    ``full_weight_grad`` gives the whole kernel gradient (the classifier).
    """
    full_shape = kernel.shape.as_list()

    @tf.custom_gradient
    def op(x, kernel, *bias):
        bias = bias[0] if bias else None
        y = tf.matmul(x, kernel)
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        kept = tf.gather(x, selection, axis=1) if selection is not None else None

        def grad(dy):
            dx = tf.matmul(dy, kernel, transpose_b=True) if input_grad else None
            dk = None
            if full_weight_grad:
                dk = tf.matmul(x, dy, transpose_a=True)
            elif selection is not None:
                def compute():
                    rows = tf.matmul(kept, dy, transpose_a=True)
                    return tf.scatter_nd(selection[:, None], rows, full_shape)
                dk = _weight_grad(compute, active, full_shape, dy.dtype)
            db = tf.reduce_sum(dy, axis=0) if (bias_grad and bias is not None) else None
            return (dx, dk, db) if bias is not None else (dx, dk)

        return y, grad

    return op(x, kernel, *([] if bias is None else [bias]))


def relu_with_mask(x, max_value=None):
    """ReLU / ReLU6 whose backward keeps only a boolean mask (the MCU keeps 1 bit)."""

    @tf.custom_gradient
    def op(x):
        y = tf.nn.relu(x) if max_value is None else tf.clip_by_value(x, 0.0, max_value)
        mask = x > 0 if max_value is None else tf.logical_and(x > 0, x < max_value)

        def grad(dy):
            return dy * tf.cast(mask, dy.dtype)

        return y, grad

    return op(x)
