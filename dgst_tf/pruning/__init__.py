"""Structured channel pruning (DepGraph-style groups, TF-MOT schedules) and activation
pattern pruning: DGSU's offline step before on-device training.

    import tensorflow_model_optimization as tfmot
    from dgst_tf import pruning

    graph = pruning.DependencyGraph(model)                  # coupled channel groups
    graph.group("block_1_project", 0).layers()              # what goes with one channel
    sparsity, _ = pruning.sparsity_for_budget(model, 1024 * 1024)   # fit 1 MB of flash
    result = pruning.prune_while_training(model, train_ds, sparsity, epochs=2)
    pruning.footprint(result.model).flash_bytes             # int8 weights + int32 biases

    # or by hand, TF-MOT style:
    wrapped = pruning.prune_channel_groups(
        model, tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, 0, 500, frequency=50))
    wrapped.fit(..., callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    small = pruning.remove_channels(tfmot.sparsity.keras.strip_pruning(wrapped))

    pattern = pruning.get_pattern("stride2")                # activation pattern pruning
    pruning.stored_bytes(pattern, (12, 12, 96))             # what the layer keeps (int8)
"""
from dgst_tf.training.activation_patterns import (
    PATTERNS,
    ActivationPattern,
    ConvGeometry,
    get_pattern,
    layer_stored_bytes,
    pattern_conv2d,
    pattern_depthwise_conv2d,
    store_for_conv,
    stored_bytes,
    weight_gradient_from_stored,
    with_activation_patterns,
)
from dgst_tf.pruning.channel_removal import (
    Footprint,
    flash_bytes,
    footprint,
    mask_groups,
    reduction,
    remove_channels,
    sparsity_for_budget,
    zeroed_groups,
)
from dgst_tf.pruning.dependency_graph import (
    ChannelGroup,
    DependencyGraph,
    Family,
    Member,
    UnsupportedLayerError,
)
from dgst_tf.pruning.structured import (
    BatchNormScale,
    ChannelGroupPruner,
    GroupImportance,
    GroupL2,
    PruneChannelGroups,
    PruningResult,
    RandomImportance,
    WeightTerm,
    channel_pruner,
    get_group_importance,
    group_scores,
    groups_to_prune,
    prune_channel_groups,
    prune_while_training,
    segment_sum_of_squares,
    select_groups,
)

__all__ = [
    "DependencyGraph", "ChannelGroup", "Member", "Family", "UnsupportedLayerError",
    "prune_channel_groups", "PruneChannelGroups", "ChannelGroupPruner", "channel_pruner",
    "prune_while_training", "PruningResult", "select_groups", "group_scores",
    "groups_to_prune", "GroupImportance", "GroupL2", "BatchNormScale", "RandomImportance",
    "WeightTerm", "get_group_importance", "segment_sum_of_squares",
    "remove_channels", "mask_groups", "zeroed_groups", "footprint", "Footprint",
    "flash_bytes", "sparsity_for_budget", "reduction",
    "ActivationPattern", "get_pattern", "PATTERNS", "ConvGeometry", "store_for_conv",
    "weight_gradient_from_stored", "pattern_conv2d", "pattern_depthwise_conv2d",
    "stored_bytes", "layer_stored_bytes", "with_activation_patterns",
]
