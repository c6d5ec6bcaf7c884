"""Argument types shared by the console scripts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def comma_separated(convert: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse ``type`` for ``a,b,c`` lists (empty items ignored): ``what`` names the items
    in the error, e.g. ``"integers"``."""

    def parse(text: str) -> list[T]:
        try:
            return [convert(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


def number(text: str) -> int | float:
    """An int if the text is one (positions keep exact integers), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)
