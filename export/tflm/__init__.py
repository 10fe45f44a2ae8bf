"""Running `.tflite` files in the pip TFLite Micro interpreter: `runner` (a child process per
run), `ops_loader` (the dgst custom-op library), `abi_check` (the wheel ABI our glue relies on).
`_child.py` is the child process's script (it imports neither TensorFlow nor dgst_tf)."""
