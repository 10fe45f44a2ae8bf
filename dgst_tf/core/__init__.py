"""The ground every stage stands on: which Keras (tf-keras), walking and rebuilding functional
graphs, BatchNorm folding, layer kinds, process settings (threads, seeds, cache) and file I/O.

Nothing here imports a later stage (training, planning, pruning, export, cli).
"""
