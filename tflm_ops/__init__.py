"""Python side of the device kernels, imported as ``dgst_tf.tflm_ops``.

`reference` is the NumPy reference of every C kernel in ``core/`` (the single oracle the C
code is tested against), `host` the ctypes binding of the cores built for this machine,
`real_step` the .npz format of one real training step and its int8 backward chain,
`real_vectors` its export from a Keras model (TensorFlow), and `mcu` the firmware's test
vectors (`mcu.gen_vectors` is the command line). Only `real_vectors` imports TensorFlow.

    from dgst_tf.tflm_ops import reference, host
"""
