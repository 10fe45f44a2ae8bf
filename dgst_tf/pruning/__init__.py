"""Structured channel pruning (DepGraph-style groups, TF-MOT schedules) and activation
pattern pruning: DGSU's offline step before on-device training.

    import tensorflow_model_optimization as tfmot
    from dgst_tf import pruning

    graph = pruning.DependencyGraph(model)                  # coupled channel groups
    graph.group("block_1_project", 0).layers()              # what goes with one channel
    sparsity, _ = pruning.sparsity_for_budget(model, 864 * 1024)    # training file, bytes
    result = pruning.prune_while_training(model, train_ds, sparsity, epochs=2)
    pruning.footprint(result.model).flash_bytes             # int8 weights + int32 biases

    # or by hand, TF-MOT style:
    wrapped = pruning.prune_channel_groups(
        model, tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, 0, 500, frequency=50))
    wrapped.fit(..., callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    small = pruning.remove_channels(tfmot.sparsity.keras.strip_pruning(wrapped))

    pattern = pruning.get_pattern("stride2")                # activation pattern pruning
    pruning.stored_bytes(pattern, (12, 12, 96))             # what the layer keeps (int8)

One concept per module: `dependency_graph` (coupled channel groups), `channel_weights`
(the weights each group owns), `group_importance` (scores, registry `GROUP_IMPORTANCES`),
`group_selection` (which groups a sparsity masks), `tfmot_wrapper` (the TF-MOT wrapper and
its shared pruner), `channel_removal` (the physically smaller model), `model_size` (flash,
activation peak, MACs, the deployable training file) and `prune_to_budget` (the whole offline step). Activation patterns
live in `dgst_tf.training.activation_patterns` (the train step uses them without TF-MOT)
and are re-exported here.
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
from dgst_tf.pruning.channel_removal import mask_groups, remove_channels, zeroed_groups
from dgst_tf.pruning.dependency_graph import (
    ChannelGroup,
    DependencyGraph,
    Family,
    Member,
    UnsupportedLayerError,
)
from dgst_tf.pruning.group_importance import (
    BatchNormScale,
    GroupImportance,
    GroupL2,
    RandomGroupImportance,
    WeightTerm,
    get_group_importance,
    segment_sum_of_squares,
)
from dgst_tf.pruning.group_selection import group_scores, groups_to_prune, select_groups
from dgst_tf.pruning.model_size import (
    DeployableSize,
    DeployableSizeModel,
    Footprint,
    deployable_bytes,
    deployable_size,
    flash_bytes,
    footprint,
    reduction,
)
from dgst_tf.pruning.prune_to_budget import (
    MOST_SPARSITY,
    PruningResult,
    prune_while_training,
    pruned_name,
    sparsity_for_budget,
)
from dgst_tf.pruning.tfmot_wrapper import (
    ChannelGroupPruner,
    PruneChannelGroups,
    channel_pruner,
    prune_channel_groups,
)

RandomImportance = RandomGroupImportance  # the name before the rename; kept for users

__all__ = [
    "DependencyGraph", "ChannelGroup", "Member", "Family", "UnsupportedLayerError",
    "prune_channel_groups", "PruneChannelGroups", "ChannelGroupPruner", "channel_pruner",
    "prune_while_training", "PruningResult", "select_groups", "group_scores",
    "groups_to_prune", "GroupImportance", "GroupL2", "BatchNormScale",
    "RandomGroupImportance", "RandomImportance",
    "WeightTerm", "get_group_importance", "segment_sum_of_squares",
    "remove_channels", "mask_groups", "zeroed_groups", "footprint", "Footprint",
    "flash_bytes", "sparsity_for_budget", "MOST_SPARSITY", "pruned_name", "reduction", "deployable_size",
    "deployable_bytes", "DeployableSize", "DeployableSizeModel",
    "ActivationPattern", "get_pattern", "PATTERNS", "ConvGeometry", "store_for_conv",
    "weight_gradient_from_stored", "pattern_conv2d", "pattern_depthwise_conv2d",
    "stored_bytes", "layer_stored_bytes", "with_activation_patterns",
]
