"""A data module's options: read from the ``data:`` sections of `residual-lightning fit` YAMLs, and checked.

`data_module_from_configs` is the body of `ResidualDataModule.from_config`: it turns each YAML's
``data:`` section (its ``init_args`` when written with a class_path) and the keyword overrides into
command-line arguments, so jsonargparse checks them against the class's signature as ``fit`` does.
`positive_ints` and `check_device_cache` check the options of a data module built directly in Python,
where no parser does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def data_module_from_configs(
    cls: type, config: str | Path | list[str | Path] | None, overrides: dict[str, Any]
):
    """An instance of `cls` built from fit YAML file(s) and dotted overrides (later ones win).

    Args:
        cls: the data module class (its signature is the schema).
        config: fit YAML file(s); None builds from `overrides` and the defaults.
        overrides: data options; strings are parsed as a command-line value would be.

    Raises:
        FileNotFoundError: a config file does not exist.
        ValueError: a config has no ``data:`` section.
    """
    import yaml
    from jsonargparse import ArgumentParser

    paths = [] if config is None else [config] if isinstance(config, str | Path) else list(config)
    args: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        fit = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        data = fit.get("data") if isinstance(fit, dict) else None
        if data is None:
            raise ValueError(f"{path} has no data: section (expected a `residual-lightning fit` config)")
        if isinstance(data, dict) and "init_args" in data:
            data = data["init_args"] or {}
        args += ["--data", yaml.safe_dump(data)]
    for key, value in overrides.items():
        args += [f"--data.{key}", value if isinstance(value, str) else json.dumps(value)]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(args)
    # `instantiate` since jsonargparse 4.49, `instantiate_classes` before.
    init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    return init.data


def positive_ints(**values: int) -> tuple[int, ...]:
    """The values as plain ints; a clear error naming the setting for one that is not positive."""
    out = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        out.append(int(value))
    return tuple(out)


def check_device_cache(mode: Any, fraction: Any) -> tuple[bool | str, float]:
    """``data.cache_on_device`` and ``data.device_cache_fraction`` checked (``"true"``/``"false"``
    strings read as booleans); a clear error naming the setting otherwise."""
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        mode = mode.lower() == "true"
    if mode not in ("auto", True, False):
        raise ValueError(f"data.cache_on_device must be auto, true or false, got {mode!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"data.device_cache_fraction must be a number in (0, 1], got {fraction!r}")
    return mode, float(fraction)
