"""The ground every stage stands on: which Keras (tf-keras), walking and rebuilding functional
graphs, BatchNorm folding, layer kinds, the classifier head (`classifier`) and the layers
the int8 training step trains through (`training_support`), process settings (threads, seeds,
cache) and file I/O.

Nothing here imports a later stage (training, planning, pruning, export, cli).
"""
