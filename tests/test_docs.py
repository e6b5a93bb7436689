from __future__ import annotations

from pathlib import Path

from activator.cli import embedded_config
from activator.config.load import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_config_is_the_demo_config() -> None:
    # `activator serve` with no --config runs the embedded copy of config/local.yaml.
    assert embedded_config().read_text() == (ROOT / "config" / "local.yaml").read_text()


def test_embedded_default_config_loads() -> None:
    settings = load_config(embedded_config())
    assert len(settings.models) == 2


def test_readme_lists_every_metric() -> None:
    from activator.observability.metrics import Metrics

    readme = (ROOT / "README.md").read_text()
    names = {metric.name for metric in Metrics().registry.collect()}
    missing = [n for n in names if n not in readme]
    assert not missing, f"README's observability section lacks {missing}"
