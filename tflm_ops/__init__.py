"""Python side of the device kernels, imported as ``dgst_tf.tflm_ops``.

`reference` is the NumPy reference of every C kernel in ``core/`` (the single oracle the C
code is tested against), `host` the ctypes binding of the cores built for this machine,
`real_vectors` the tensors of one real training step for the MCU firmware, and
`mcu.gen_vectors` the firmware's test vectors.

    from dgst_tf.tflm_ops import reference
"""
