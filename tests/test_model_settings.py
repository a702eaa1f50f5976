"""``[models."<id>"]`` tables: parsed into ``Settings.models``, sampling keys gathered as
defaults, template files taken relative to the config file, and every mistake a
ConfigError naming the table and the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from modeld.errors import ConfigError
from modeld.settings.config import Settings, add_settings_arguments, load_settings
from modeld.settings.per_model import NO_MODEL_SETTINGS, ModelSettings, template_file

TABLES = """
n_ctx = 512

[models."tiny-a.gguf"]
aliases = ["tiny", "org/tiny:latest"]
chat_template = "chatml"
n_ctx = 256
n_gpu_layers = 0
threads = 2
pin = true
temperature = 0.2
stop = ["\\n\\n"]
max_tokens = 64

[models."tiny-b.gguf"]
chat_template = "templates/b.jinja"
"""


def load(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "modeld.toml"
    config.write_text(text)
    return load_settings({"config": str(config)}, env={})


def test_tables_become_model_settings(tmp_path: Path) -> None:
    settings = load(tmp_path, TABLES)
    own = settings.model("tiny-a.gguf")
    assert own == ModelSettings(
        aliases=("tiny", "org/tiny:latest"), chat_template="chatml", n_ctx=256, n_gpu_layers=0,
        threads=2, pin=True, defaults={"temperature": 0.2, "stop": ["\n\n"], "max_tokens": 64},
    )  # fmt: skip
    assert settings.n_ctx == 512  # the global value is untouched
    assert settings.model("tiny-b.gguf").chat_template == str(tmp_path / "templates/b.jinja")
    assert settings.model("other.gguf") is NO_MODEL_SETTINGS


def test_aliases_resolve_and_other_names_pass_through(tmp_path: Path) -> None:
    settings = load(tmp_path, TABLES)
    assert settings.resolve_model_name("tiny") == "tiny-a.gguf"
    assert settings.resolve_model_name("org/tiny:latest") == "tiny-a.gguf"
    assert settings.resolve_model_name("tiny-b.gguf") == "tiny-b.gguf"
    assert settings.resolve_model_name("unknown") == "unknown"


def test_tables_beside_a_modeld_section(tmp_path: Path) -> None:
    settings = load(tmp_path, '[modeld]\nport = 9000\n[models."m.gguf"]\npin = true\n')
    assert settings.port == 9000
    assert settings.model("m.gguf").pin


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[models."m.gguf"]\ncolour = "blue"\n', ['[models."m.gguf"]', "colour"]),
        ('[models."m.gguf"]\ntemperature = 9\n', ['[models."m.gguf"]', "temperature"]),
        ('[models."m.gguf"]\nn_ctx = 1\n', ['[models."m.gguf"]', "n_ctx"]),
        ('[models."m.gguf"]\naliases = ["has space"]\n', ['[models."m.gguf"]', "aliases"]),
        ('[models."m.gguf"]\npin = "yes"\n', ['[models."m.gguf"]', "pin"]),
        ('[models."../m.gguf"]\npin = true\n', ["'../m.gguf'"]),
        ('[models."m.txt"]\npin = true\n', ["'m.txt'"]),
        ('[models."a.gguf"]\naliases = ["x"]\n[models."b.gguf"]\naliases = ["x"]\n', ["'x'"]),
        ('[models."a.gguf"]\naliases = ["b.gguf"]\n[models."b.gguf"]\npin = true\n', ["'b.gguf'"]),
        ("models = 3\n", ["models"]),
        ('[models]\n"m.gguf" = 3\n', ['[models."m.gguf"]']),
    ],
    ids=["unknown-key", "bad-default", "bad-n-ctx", "bad-alias", "bad-type", "path-id",
         "not-gguf", "shared-alias", "alias-is-an-id", "not-a-table", "table-not-a-table"],
)  # fmt: skip
def test_mistakes_name_the_table_and_key(tmp_path: Path, text: str, named: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    for part in named:
        assert part in caught.value.message


def test_tables_come_from_the_file_only() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert "--models" not in flags
    assert "--models-dir" in flags
    assert load_settings({}, env={"MODELD_MODELS": "x"}).models == {}
    with pytest.raises(ConfigError):
        load_settings({"models": {}}, env={})


def test_library_users_build_them_directly() -> None:
    settings = Settings(models={"m.gguf": ModelSettings(aliases=("m",), defaults={"top_k": 5})})
    assert settings.resolve_model_name("m") == "m.gguf"
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        ModelSettings(defaults={"colour": 1})
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"defaults": {"top_k": -1}}, ModelSettings)


def test_a_new_per_model_setting_is_one_field() -> None:
    """What issue 12's keep_alive needs: a field of ModelSettings, nothing else (the
    table's other keys reach it as they are)."""
    fields = {f.name for f in msgspec.structs.fields(ModelSettings)}
    assert fields == {
        "aliases", "chat_template", "tool_format", "n_ctx", "n_gpu_layers", "threads", "pin",
        "keep_alive", "defaults",
    }  # fmt: skip


def test_the_tool_format_setting_names_a_known_format() -> None:
    from modeld.tools import ToolFormat, resolve_format

    assert msgspec.convert({"tool_format": "mistral"}, ModelSettings).tool_format == "mistral"
    with pytest.raises(msgspec.ValidationError, match="tool_format"):
        msgspec.convert({"tool_format": "nope"}, ModelSettings)
    for fmt in ToolFormat:  # every format can be named, and the name wins over the template
        assert (
            resolve_format("<tool_call>", ModelSettings(tool_format=fmt.value).tool_format) is fmt
        )


@pytest.mark.parametrize(
    ("value", "is_file"),
    [("gemma", False), ("llama3", False), ("mistral-v7-tekken", False), ("x.jinja", True),
     ("dir/x", True), ("/abs/t.j2", True), ("~/t.jinja2", True)],
)  # fmt: skip
def test_a_template_value_is_a_file_or_a_builtin_name(value: str, is_file: bool) -> None:
    assert (template_file(value) is not None) is is_file


def test_resolve_puts_a_models_own_values_over_the_global_ones() -> None:
    """``Settings.resolve``: the one place of the "own value, else the global" rule."""
    own = ModelSettings(
        aliases=("fast",),
        chat_template="chatml",
        n_ctx=512,
        n_gpu_layers=0,
        threads=3,
        pin=True,
        keep_alive="10m",
        defaults={"temperature": 0.2},
    )
    settings = Settings(
        n_ctx=2048, n_gpu_layers=-1, threads=2, keep_alive="5m", models={"a.gguf": own}
    )
    model = settings.resolve("fast")
    assert (model.id, model.n_ctx, model.n_gpu_layers, model.threads) == ("a.gguf", 512, 0, 3)
    assert (model.keep_alive, model.chat_template, model.pin) == ("10m", "chatml", True)
    assert dict(model.defaults) == {"temperature": 0.2}
    with pytest.raises(TypeError):
        model.defaults["temperature"] = 1.0  # type: ignore[index]
    other = settings.resolve("b.gguf")  # no table: every value the global one
    assert (other.id, other.n_ctx, other.n_gpu_layers, other.threads) == ("b.gguf", 2048, -1, 2)
    assert (other.keep_alive, other.chat_template, other.pin) == ("5m", None, False)
    assert dict(other.defaults) == {}
