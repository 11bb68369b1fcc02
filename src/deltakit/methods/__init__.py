"""PEFT methods, one file each; each registers itself with ``@register_method``.

Importing this package imports every module in it not starting with ``_``, so adding a
method is adding a file (``import deltakit`` does it; the core registry imports nothing).
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")
