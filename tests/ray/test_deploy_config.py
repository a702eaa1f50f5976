"""deploy/ray/modeld.yaml is a valid Serve config whose arguments modeld accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

serve_schema = pytest.importorskip("ray.serve.schema")
yaml = pytest.importorskip("yaml")
modeld_ray = pytest.importorskip("modeld.ray")

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "modeld.yaml"


def test_the_example_config_validates_and_builds(tmp_path: Path) -> None:
    data = yaml.safe_load(CONFIG.read_text())
    config = serve_schema.ServeDeploySchema.model_validate(data)
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "modeld.ray:app_builder"
    settings, options = modeld_ray.parse_args({**app.args, "models_dir": str(tmp_path)})
    assert options.num_replicas == 2
    assert settings.vram_budget_mb == 8192
    built = modeld_ray.app_builder({**app.args, "models_dir": str(tmp_path)})
    assert type(built).__name__ == "Application"


def test_every_key_in_the_example_is_known() -> None:
    """A typo in the example would fail a user's deploy; it fails here first."""
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    modeld_ray.parse_args(app["args"])  # raises ConfigError naming an unknown key
