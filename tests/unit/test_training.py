import numpy as np
import pytest
import torch

from common.config import RunSettings
from common.data.site import load_site
from common.model import build_model
from common.training import evaluate, predict, train


@pytest.fixture(scope="module")
def site(synthetic_sites):
    return load_site(synthetic_sites[0], "training"), load_site(synthetic_sites[0], "test")


def test_local_training_improves_the_test_dice(site):
    train_cases, test_cases = site
    settings = RunSettings.from_run_config({"local-epochs": 3})
    torch.manual_seed(0)
    model = build_model(settings.model)
    cpu = torch.device("cpu")
    before = evaluate(model, test_cases, settings, cpu).summary["dice"]
    result = train(model, train_cases, settings, cpu, seed=0)
    after = evaluate(model, test_cases, settings, cpu).summary["dice"]
    assert result.num_cases == len(train_cases)  # FedAvg's weight is cases
    assert result.steps > result.num_cases  # slices and patches, not cases
    assert np.isfinite(result.mean_loss)
    assert after > before + 0.2


def test_2d_model_segments_a_volume_slice_by_slice(site):
    case = site[1][0]
    settings = RunSettings()
    out = predict(build_model(settings.model), case.image, settings, torch.device("cpu"))
    assert out.shape == case.label.shape and out.dtype == np.uint8


def test_3d_model_trains_on_volumes(site):
    settings = RunSettings.from_run_config(
        {"model-spatial-dims": 3, "model-channels": "8,16", "patch-size": 16, "batch-size": 2})
    model = build_model(settings.model)
    result = train(model, site[0][:2], settings, torch.device("cpu"))
    assert result.num_cases == 2 and np.isfinite(result.mean_loss)
    pred = predict(model, site[1][0].image, settings, torch.device("cpu"))
    assert pred.shape == site[1][0].label.shape


def test_rgb_retina_image_trains_in_grey_and_rgb(retina_dir):
    cases = load_site(retina_dir / "stare", "training")[:1]
    for channels in ("grey", "rgb", "green"):
        settings = RunSettings.from_run_config(
            {"input-channels": channels, "model-channels": "8,16", "patch-size": 32,
             "batch-size": 2})
        result = train(build_model(settings.model), cases, settings, torch.device("cpu"))
        assert np.isfinite(result.mean_loss)
