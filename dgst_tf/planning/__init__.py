"""Planning before training: what a training step costs in SRAM and which scheme to run.

`memory` (the analytic int8 memory of one batch-1 training step: `MemoryModel`,
`training_memory`), built on `memory_graph` (which tensors live when in the Keras graph) and
`extra_memory` (Lin et al.'s "extra memory" label); `memory_report` (the report types, charts
and the check against TFLM's arena), `budget` (reading "256KB", refusing schemes that do not
fit), `contribution` (Lin et al.'s contribution analysis) and `search` (scheme search under a
budget).

    from dgst_tf.planning.memory import training_memory
    report = training_memory(model, scheme)
"""
