"""Planning before training: what a training step costs in SRAM and which scheme to run.

`memory` (the analytic int8 memory of one batch-1 training step as `export_training` emits
it: `MemoryModel`, `training_memory`), built on `memory_graph` (the Keras graph's values and
buffers), `step_timeline` (the exported step's ops and tensors, in order), `tflm_runtime`
(TFLM's own arena bytes) and `extra_memory` (Lin et al.'s "extra memory" label);
`memory_report` (the report types, charts and the check against TFLM's arena), `budget` (reading "256KB", refusing schemes that do not
fit), `contribution` (Lin et al.'s contribution analysis) and `search` (scheme search under a
budget).

    from dgst_tf.planning.memory import training_memory
    report = training_memory(model, scheme)
"""
