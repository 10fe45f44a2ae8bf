import json

import pytest
from small_models import residual_cnn

from dgst_tf import models
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.training.scheme import LayerUpdate, SchemeError, UpdateScheme, conv_layers


@pytest.fixture(scope="module")
def mbv2():
    return models.mobilenet_v2(width=0.35, input_shape=(128, 128, 3), classes=10, weights=None)


def test_config_and_json_round_trip(tmp_path):
    scheme = UpdateScheme({"expand": 0.25, "depthwise": "bias", "project": {"mode": "weights",
                                                                          "ratio": 0.5}})
    assert UpdateScheme.from_config(json.loads(json.dumps(scheme.get_config()))) == scheme
    scheme.save(tmp_path / "s.json")
    assert UpdateScheme.load(tmp_path / "s.json") == scheme
    assert list(tmp_path.iterdir()) == [tmp_path / "s.json"]  # no temp file left behind


@pytest.mark.parametrize("spec, message", [
    ({"nope": 0.5}, "'nope' is not in model"),
    ({"stem_bn": "bias"}, "is a BatchNormalization, not a Conv2D"),
    ({"expand": 1.5}, r"ratio must be in \(0, 1\], got 1.5"),
    ({"expand": {"mode": "weights", "ratio": 0.0}}, r"ratio must be in \(0, 1\]"),
    ({"classifier": "bias"}, "is the classifier"),
    ({"expand": "sometimes"}, "mode must be one of"),
])
def test_invalid_schemes_name_the_layer(spec, message):
    with pytest.raises(SchemeError, match=message):
        UpdateScheme(spec).validate(residual_cnn())


def test_backward_config_round_trip_on_mobilenet_v2(mbv2):
    convs = conv_layers(mbv2)
    assert len(convs) == 52  # tiny-training's conv indexing for MobileNetV2
    config = {"n_bias_update": 22, "manual_weight_idx": "36-39-40-41-42-45-48-49",
              "weight_update_ratio": "1-1-0-0.25-0.125-0.125-0-0.5"}
    scheme = UpdateScheme.from_backward_config(mbv2, **config)
    assert scheme.update_for(convs[36].name) == LayerUpdate("weights", 1.0)
    assert scheme.update_for(convs[40].name) == LayerUpdate("bias")  # ratio 0: bias only
    assert scheme.update_for(convs[29].name) == LayerUpdate("frozen")
    assert scheme.update_for(convs[30].name) == LayerUpdate("bias")
    assert scheme.to_backward_config(mbv2) == {
        "n_bias_update": 22, "manual_weight_idx": "36-39-41-42-45-49",
        "weight_update_ratio": "1-1-0.25-0.125-0.125-0.5"}


def test_weight_layer_outside_bias_range_is_rejected(mbv2):
    with pytest.raises(SchemeError, match="must also update its bias"):
        UpdateScheme.from_backward_config(mbv2, n_bias_update=5, manual_weight_idx="36",
                                          weight_update_ratio="1")


def test_baselines_and_target_fraction(mbv2):
    model = fold_batchnorm(mbv2)
    assert UpdateScheme.full(model).updated_weight_fraction(model) == pytest.approx(1.0)
    assert UpdateScheme.last_layer(model).layers == {}
    assert all(u.mode == "bias" for u in UpdateScheme.bias_only(model).layers.values())
    expands = [l.name for l in conv_layers(model) if l.name.endswith("_expand")][-8:]
    scheme = UpdateScheme.for_target_fraction(model, expands, target=0.02)
    assert 0.0195 <= scheme.updated_weight_fraction(model) <= 0.02


def test_stage_aware_scheme_freezes_front_stages(mbv2):
    from dgst_tf.training.scheme import conv_stages

    stages = conv_stages(mbv2)
    assert [tuple(s[0].output_shape[1:3]) for s in stages] == [
        (64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    scheme = UpdateScheme.stage_aware(mbv2, {-2: 0.125, -1: 0.25})
    for layer in [l for stage in stages[:3] for l in stage]:
        assert scheme.update_for(layer.name).mode == "frozen"
    last = {l.name for l in stages[-1]}
    for name, update in scheme.layers.items():
        if update.mode == "weights":
            assert update.ratio == (0.25 if name in last else 0.125)
            assert mbv2.get_layer(name).kernel_size == (1, 1)
    with pytest.raises(SchemeError, match="stage 9 outside"):
        UpdateScheme.stage_aware(mbv2, {9: 0.5})


def test_channel_counts_round_trip_and_old_json_still_loads(tmp_path):
    scheme = UpdateScheme({"expand": {"mode": "weights", "ratio": 0.25, "channels": 3},
                           "project": 0.5})
    assert scheme.update_for("expand") == LayerUpdate("weights", 0.25, 3)
    assert scheme.get_config()["layers"]["expand"]["channels"] == 3
    assert "channels" not in scheme.get_config()["layers"]["project"]  # old format unchanged
    scheme.save(tmp_path / "s.json")
    assert UpdateScheme.load(tmp_path / "s.json") == scheme
    old = {"name": "old", "layers": {"expand": {"mode": "weights", "ratio": 0.25}}}
    assert UpdateScheme.from_config(old).update_for("expand").channels is None


def test_kept_channels_prefers_the_stored_count_and_accepts_a_bare_ratio():
    from dgst_tf.core.geometry import channels_for_ratio
    from dgst_tf.core.layer_kinds import input_channels
    from dgst_tf.training.scheme import kept_channels

    model = residual_cnn()
    layer = model.get_layer("expand")
    channels = input_channels(layer)
    assert kept_channels(layer, 0.5) == channels_for_ratio(0.5, channels)
    assert kept_channels(layer, LayerUpdate("weights", 0.5)) == channels_for_ratio(0.5, channels)
    assert kept_channels(layer, LayerUpdate("weights", 0.5, 1)) == 1
    assert kept_channels(layer, LayerUpdate("bias")) == 0
    scheme = UpdateScheme({"expand": {"mode": "weights", "ratio": 1.0, "channels": 1}})
    assert scheme.kept_channels(layer) == 1
    assert scheme.kept_channels(model.get_layer("project")) == 0


@pytest.mark.parametrize("update, message", [
    ({"mode": "weights", "ratio": 0.5, "channels": 0}, "channels must be a whole number >= 1"),
    ({"mode": "weights", "ratio": 0.5, "channels": 2.5}, "channels must be a whole number"),
    ({"mode": "bias", "channels": 2}, "channels only apply to a weight update"),
    ({"mode": "weights", "ratio": 0.5, "channels": 10_000}, "keeps 10000 channels but has only"),
])
def test_invalid_channel_counts_name_the_layer(update, message):
    with pytest.raises(SchemeError, match=f"'expand'.*{message}"):
        UpdateScheme({"expand": update}).validate(residual_cnn())


@pytest.mark.parametrize("target", [0.005, 0.02, 0.1])
def test_target_fraction_stores_the_channel_counts_the_ratios_gave(mbv2, target):
    """Whole counts in the scheme: the same counts as rounding the stored ratio back."""
    from dgst_tf.core.geometry import channels_for_ratio
    from dgst_tf.core.layer_kinds import input_channels
    from dgst_tf.training.sparse_model import SparseUpdateModel

    model = fold_batchnorm(mbv2)
    expands = [l.name for l in conv_layers(model) if l.name.endswith("_expand")][-8:]
    scheme = UpdateScheme.for_target_fraction(model, expands, target=target)
    sparse = SparseUpdateModel(model, scheme, fold_bn=False)
    for name in expands:
        update, layer = scheme.update_for(name), model.get_layer(name)
        assert update.channels == channels_for_ratio(update.ratio, input_channels(layer))
        assert sparse.selection.specs[name] == (input_channels(layer), update.channels)
    assert UpdateScheme.from_config(json.loads(json.dumps(scheme.get_config()))) == scheme
