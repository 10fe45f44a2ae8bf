"""Compatibility alias: budgets live in `dgst_tf.planning.budget`.

    from dgst_tf.budget import MemoryBudget, check_budget   # same as dgst_tf.planning.budget
"""
from dgst_tf.planning.budget import *  # noqa: F401,F403
from dgst_tf.planning.budget import __all__  # noqa: F401
