from __future__ import annotations

from pathlib import Path

import pytest

from ortmux.worker.errors import InvalidArgument
from ortmux.worker.settings import Settings


def test_defaults() -> None:
    settings = Settings.load([], environ={})
    assert settings.port == 50051
    assert settings.models == []
    assert settings.model_paths() == {}


def test_flags_beat_environment_beat_config_file(tmp_path: Path) -> None:
    config = tmp_path / "ortmux.toml"
    config.write_text('port = 1000\nmetrics_port = 1001\ndata_dir = "/from/config"\nlog_level = "DEBUG"\n')
    environ = {"ORTMUX_CONFIG": str(config), "ORTMUX_PORT": "2000", "ORTMUX_METRICS_PORT": "2001"}
    settings = Settings.load(["--port", "3000"], environ=environ)
    assert settings.port == 3000
    assert settings.metrics_port == 2001
    assert settings.data_dir == Path("/from/config")
    assert settings.log_level == "DEBUG"


def test_models_from_repeated_flag_and_comma_separated_environment() -> None:
    flags = Settings.load(["--model", "a=/m/a.onnx", "--model", "b=/m/b.onnx"], environ={})
    assert flags.model_paths() == {"a": Path("/m/a.onnx"), "b": Path("/m/b.onnx")}
    env = Settings.load([], environ={"ORTMUX_MODELS": "a=/m/a.onnx, b=/m/b.onnx"})
    assert env.model_paths() == flags.model_paths()


@pytest.mark.parametrize("entry", ["noequals", "=/path", "name="])
def test_malformed_model_entry_is_refused(entry: str) -> None:
    with pytest.raises(InvalidArgument, match="is not NAME=PATH"):
        Settings.load(["--model", entry], environ={}).model_paths()


def test_duplicate_model_name_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="given twice"):
        Settings.load(["--model", "a=/x", "--model", "a=/y"], environ={}).model_paths()


def test_wrong_type_names_the_setting() -> None:
    with pytest.raises(InvalidArgument, match="setting 'port' must be int, got 'abc'"):
        Settings.load([], environ={"ORTMUX_PORT": "abc"})


def test_config_file_with_unknown_key_or_bad_toml_is_refused(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 1\n")
    with pytest.raises(InvalidArgument, match="unknown settings prot"):
        Settings.load(["--config", str(unknown)], environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        Settings.load(["--config", str(broken)], environ={})


def test_every_field_is_documented() -> None:
    for field in Settings.fields():
        assert field.metadata.get("help"), field.name


def test_quantize_takes_its_kinds_and_refuses_others() -> None:
    assert Settings.load([], environ={}).quantize == "none"
    assert Settings.load(["--quantize", "int4"], environ={}).quantize == "int4"
    assert Settings.load([], environ={"ORTMUX_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(
        InvalidArgument, match="setting 'quantize' must be one of none, int8, int4, got 'fp8'"
    ):
        Settings.load(["--quantize", "fp8"], environ={})
