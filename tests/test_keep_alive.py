"""Keep-alive values: what each form means, and what is refused (with the field named)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import msgspec
import pytest

from modeld.errors import ConfigError
from modeld.settings.config import add_settings_arguments, load_settings
from modeld.settings.keep_alive import KeepAlive, keep_alive_seconds
from modeld.types import InferRequest


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("2m3.5s", 123.5),
        ("300", 300.0),
        (" 10s ", 10.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("-1", math.inf),
        ("-1m", math.inf),
        (0, 0.0),
        (0.0, 0.0),  # ollama-python sends keep_alive=0 as 0.0
        (90, 90.0),
        (-1, math.inf),
        (-0.5, math.inf),
        (10**12, math.inf),  # past a century: never
    ],
)
def test_keep_alive_seconds(value: str | float, seconds: float) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "5 minutes", "m", "1d", "5m-", "--1", "1e3", "five"])
def test_what_is_not_a_duration(value: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        keep_alive_seconds(value)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(value, KeepAlive)


def test_the_setting_from_each_source(tmp_path: Path) -> None:
    assert load_settings({}, env={}).keep_alive == "5m"  # Ollama's default
    assert load_settings({"keep_alive": "-1"}, env={}).keep_alive == "-1"
    assert load_settings({}, env={"MODELD_KEEP_ALIVE": "0"}).keep_alive == "0"
    config = tmp_path / "modeld.toml"
    config.write_text("[modeld]\nkeep_alive = 600\n")
    assert load_settings({"config": str(config)}, env={}).keep_alive == 600.0
    with pytest.raises(ConfigError, match="keep_alive"):
        load_settings({"keep_alive": "forever"}, env={})


def test_the_flag_takes_a_negative_number() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = vars(parser.parse_args(["--keep-alive", "-1"]))
    assert load_settings(flags, env={}).keep_alive == "-1"


def test_a_request_body_names_the_field() -> None:
    body = msgspec.json.decode(b'{"prompt": "x", "keep_alive": "10m"}', type=InferRequest)
    assert body.keep_alive == "10m"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.keep_alive"):
        msgspec.json.decode(b'{"prompt": "x", "keep_alive": "soon"}', type=InferRequest)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.keep_alive"):
        msgspec.json.decode(b'{"prompt": "x", "keep_alive": true}', type=InferRequest)


def test_a_model_table_takes_its_own(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    config = tmp_path / "modeld.toml"
    config.write_text(
        f'[modeld]\nmodels_dir = "{tmp_path}"\n[models."m.gguf"]\nkeep_alive = "30m"\n'
    )
    settings = load_settings({"config": str(config)}, env={})
    assert settings.model("m.gguf").keep_alive == "30m"
    assert settings.model("other.gguf").keep_alive is None  # --keep-alive applies
    config.write_text(
        f'[modeld]\nmodels_dir = "{tmp_path}"\n[models."m.gguf"]\nkeep_alive = "soon"\n'
    )
    with pytest.raises(ConfigError, match="keep_alive"):
        load_settings({"config": str(config)}, env={})
