"""Settings are declared once; what a user types is checked against that
declaration before anything starts; pyproject.toml and docs/settings.md follow it."""

import tomllib
from pathlib import Path

import pytest

from common import wire
from common.config import (
    RunSettings,
    SiteSettings,
    check_node_config,
    check_run_overrides,
    parse_key_values,
    settings_markdown,
)
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_is_the_declared_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # ... and the wire version the bundle speaks, which is no setting (common/wire.py)
    assert table == {wire.VERSION_KEY: wire.VERSION, **RunSettings.defaults()}


def test_docs_settings_list_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "settings.md").read_text() == settings_markdown(), (
        "docs/settings.md is stale: python -m common.config > docs/settings.md")


def test_run_config_round_trip():
    settings = RunSettings.from_run_config({"num-rounds": 7, "model-channels": "8,16",
                                            "patch-size": 32, "dp": "client-fixed"})
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    assert settings.model.channels == (8, 16) and settings.model.divisor == 2


@pytest.mark.parametrize(("typed", "says"), [
    ({"learning-rat": "0.5"}, "unknown setting 'learning-rat' (did you mean 'learning-rate'?)"),
    ({"local-epochs": "abc"}, "setting 'local-epochs' must be an integer, got 'abc'"),
    ({"local-epochs": "1.5"}, "setting 'local-epochs' must be an integer, got '1.5'"),
    ({"resume": "maybe"}, "setting 'resume' must be true or false, got 'maybe'"),
    ({"num-rounds": "0"}, "setting 'num-rounds' must be at least 1, got 0"),
    ({"strategy": "fedsgd"}, "setting 'strategy' must be one of fedavg, fedprox, fednova, "
                             "fedadam, got 'fedsgd'"),
    ({"model-channels": "16,x"}, "setting 'model-channels' must be comma-separated"),
])
def test_what_a_user_types_is_refused_naming_the_key(typed, says):
    with pytest.raises(ConfigError) as err:
        check_run_overrides(typed)
    assert str(err.value).startswith(says)


def test_command_line_text_becomes_typed_values():
    settings = check_run_overrides(parse_key_values(
        ["learning-rate=0.5", "test-time-flips=false", "num-rounds=3", "run-name='x'"]))
    assert (settings.learning_rate, settings.test_time_flips, settings.num_rounds,
            settings.run_name) == (0.5, False, 3, "x")
    with pytest.raises(ConfigError, match="--config takes KEY=VALUE, got 'rounds'"):
        parse_key_values(["rounds"])


def test_flowers_merged_run_config_is_read_leniently_but_typed():
    """Flower's run config may carry keys of its own; types are still checked."""
    assert RunSettings.from_run_config({"some-flower-key": 1}).num_rounds == 5
    with pytest.raises(ConfigError, match="'batch-size' must be an integer"):
        RunSettings.from_run_config({"batch-size": "eight"})


def test_node_settings_are_checked(monkeypatch):
    monkeypatch.delenv("FEDSEG_DEVICE", raising=False)
    monkeypatch.delenv("FEDSEG_THREADS", raising=False)
    assert check_node_config({"device": "cuda:1", "threads": "2"}) == {"device": "cuda:1",
                                                                      "threads": 2}
    with pytest.raises(ConfigError, match=r"unknown node setting 'devic' \(did you mean "
                                          r"'device'\?\)"):
        check_node_config({"devic": "cpu"})
    with pytest.raises(ConfigError, match="node setting 'device' must be auto, cpu or cuda"):
        check_node_config({"device": "gpu"})
    with pytest.raises(ConfigError, match="setting 'threads' must be an integer"):
        check_node_config({"threads": "many"})
    site = SiteSettings.from_node_config({"data-dir": "/srv/site", "site-name": "a",
                                         "threads": 3})
    assert (site.name, site.data_dir, site.threads, site.device) == ("a", Path("/srv/site"),
                                                                    3, "auto")


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\x"])
def test_a_run_name_that_is_a_path_is_refused(name):
    """A site keeps a run's model in models/RUN-NAME/: a coordinator's '.' would
    put it in models/ itself, '..' and separators outside it."""
    with pytest.raises(ConfigError, match="setting 'run-name' is a name, not a path"):
        RunSettings.from_run_config({"run-name": name})
