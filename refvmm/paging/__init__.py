"""Paging strategies by name: how a VM virtualizes the guest's address translation.

``make_strategy(name)`` returns a fresh :class:`~refvmm.paging.base.PagingStrategy`:

* ``shadow`` -- :class:`refvmm.paging.shadow.ShadowPaging`: the hardware runs on
  VMM-built shadow tables, a software TLB over the guest's own page tables;
* ``nested`` -- :class:`refvmm.paging.nested.NestedPaging`: the hardware walks the
  guest's tables and then the VMM's nested tables (APM Vol. 2 15.25).

A strategy holds per-VM state (tables, guest-visible registers), so every VM gets its
own instance.  An unknown name is a :class:`UnknownStrategy` error naming the known ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from refvmm.paging.base import GuestControlRegs, PagingStrategy

STRATEGIES: dict[str, str] = {
    "shadow": "refvmm.paging.shadow:ShadowPaging",
    "nested": "refvmm.paging.nested:NestedPaging",
}
"""Strategy name -> ``module:class`` (imported on first use: the strategies import the spec CPU)."""


class UnknownStrategy(ValueError):
    """A paging strategy name nobody registered (one line)."""


def make_strategy(name: str) -> PagingStrategy:
    """A new instance of the paging strategy ``name`` (``shadow`` or ``nested``)."""
    target = STRATEGIES.get(name)
    if target is None:
        raise UnknownStrategy(f"unknown paging strategy {name!r} (known: {', '.join(STRATEGIES)})")
    module_name, _, attr = target.partition(":")
    factory: Callable[[], PagingStrategy] = getattr(importlib.import_module(module_name), attr)
    return factory()


__all__ = ["STRATEGIES", "GuestControlRegs", "PagingStrategy", "UnknownStrategy", "make_strategy"]
