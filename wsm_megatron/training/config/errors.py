"""The one configuration error, and the small validators the sections share."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key."""


def _positive(section: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {value}")
