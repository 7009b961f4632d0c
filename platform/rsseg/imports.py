"""Import strings ("module:attribute") resolved on first use: plugins and builders stay light
until something needs them."""

from __future__ import annotations

import importlib
from typing import Any


def load_object(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
