"""dgst_tf.export: from a trained Keras model and its update scheme to TFLM `.tflite` files.

This folder is installed as the `dgst_tf.export` package (see `package_dir` in setup.cfg).
The inference and training exporters arrive with issue 6; nothing is exported yet.
"""
