"""peft method converters, one file per peft method, each registered with ``@register_converter``.

Importing this package imports every module in it not starting with ``_``, so supporting
another peft method is adding a file; ``deltakit.io.peft`` only dispatches.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ._common import (PREFIX, PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource,
                      converter_for_method, converter_for_peft_type, register_converter)

__all__ = ["PREFIX", "PeftConverter", "PeftExport", "PeftFormatError", "PeftImport", "PeftSource",
           "converter_for_method", "converter_for_peft_type", "register_converter"]

for _m in _pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")
