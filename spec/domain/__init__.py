"""Bit-vector domains: the one interface the semantics use, and its interpretations."""

from spec.domain.base import Bool, Domain, SymbolicValueError, Value, mask
from spec.domain.concrete import CONCRETE, ConcreteDomain

__all__ = ["CONCRETE", "Bool", "ConcreteDomain", "Domain", "SymbolicValueError", "Value", "mask"]
