"""Compatibility alias: the memory model lives in `dgst_tf.planning.memory`.

    from dgst_tf.memory import training_memory      # same as dgst_tf.planning.memory
"""
from dgst_tf.planning.memory import *  # noqa: F401,F403
from dgst_tf.planning.memory import __all__  # noqa: F401
