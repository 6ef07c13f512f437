"""Instruction semantics, one module per family, registered into :data:`SEMANTICS`.

Importing this package imports every family module in it (each registers its
instructions with :func:`spec.isa.registry.instruction`).
"""

import importlib
import pkgutil

from spec.isa.registry import SEMANTICS, Semantics, instruction

_SUPPORT = {"registry", "context"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["SEMANTICS", "Semantics", "instruction"]
