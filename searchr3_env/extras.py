"""Optional heavy integrations are imported lazily, failing with the extra that provides them."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError telling which extra ``feature`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{feature} needs the {extra!r} extra: pip install 'searchr3[{extra}]' ({err})") from None
