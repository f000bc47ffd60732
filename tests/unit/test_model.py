import pytest
import torch

from common.config import ModelSettings, RunSettings
from common.errors import ConfigError
from common.model import build_model, pick_device


@pytest.mark.parametrize(
    ("dims", "shape"), [(2, (2, 1, 64, 48)), (3, (1, 1, 32, 32, 16))]
)
def test_unet_output_keeps_spatial_shape_with_two_class_logits(dims, shape):
    model = build_model(ModelSettings(spatial_dims=dims, channels=(8, 16, 32)))
    out = model(torch.zeros(shape))
    assert out.shape == (shape[0], 2, *shape[2:])


def test_default_unet_is_the_documented_size():
    model = build_model(ModelSettings())
    assert sum(p.numel() for p in model.parameters()) == 1_625_161
    # instance norm keeps no running statistics: the state is all float weights
    assert all(v.is_floating_point() for v in model.state_dict().values())


def test_rgb_input_channels_come_from_run_config():
    settings = RunSettings.from_run_config({"input-channels": "rgb"})
    model = build_model(settings.model)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model-spatial-dims": 4}, "model-spatial-dims"),
        ({"patch-size": 50}, "multiple of 16"),
        ({"model-channels": "16,x"}, "comma-separated"),
        ({"num-rounds": 0}, "num-rounds"),
        ({"run-name": "../elsewhere"}, "not a path"),
        ({"resume": "maybe"}, "true or false"),
    ],
)
def test_bad_settings_say_what_is_wrong(cfg, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config(cfg)


def test_run_config_round_trips():
    settings = RunSettings.from_run_config({"num-rounds": 7, "model-channels": "8,16,32",
                                            "patch-size": 32})
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


def test_auto_device_is_cuda_exactly_when_available():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")
