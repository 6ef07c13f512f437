"""Backend registry: backend names (as typed on the command line) -> constructors, and availability.

Built in:

* ``spec``    -- the bare spec CPU (:class:`difftest.backend.SpecBackend`), the reference;
* ``unicorn`` -- Unicorn / QEMU TCG (:mod:`difftest.backends.unicorn`);
* ``kvm``     -- this machine's KVM through ``/dev/kvm`` (:mod:`difftest.backends.kvm`);
* the VMM backends, when :mod:`difftest.backends.refvmm` exists: that module
  declares them in a module-level ``BACKENDS`` mapping of name (for example
  ``refvmm-shadow``, ``refvmm-nested``) to a zero-argument constructor.

Other implementations plug in two ways:

* from Python, :func:`register` (a campaign's worker processes are forked, so
  they see every registration made before the campaign starts);
* from the environment, ``REFVMM_BACKENDS="name=package.module:factory,..."``,
  read by :func:`load_environment` (the ``refvmm`` command line calls it) --
  how a user's own emulator joins ``refvmm campaign --backends spec,name``.

A constructor takes no arguments and returns a
:class:`~difftest.backend.Backend`.  A backend is *available* when its
``capabilities().available`` is true; an unavailable backend (no /dev/kvm, ...)
says why, and a campaign runs without it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from difftest.backend import Backend

Factory = Callable[[], Backend]
ENV_VAR = "REFVMM_BACKENDS"
REFERENCE = "spec"


class RegistryError(ValueError):
    """An unknown backend name or a bad backend declaration (one line)."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Factory
    description: str = ""


def _spec() -> Backend:
    from difftest.backend import SpecBackend

    return SpecBackend(deliver_exceptions=False)


def _unicorn() -> Backend:
    from difftest.backends.unicorn import UnicornBackend

    return UnicornBackend()


def _kvm() -> Backend:
    from difftest.backends.kvm import KvmBackend

    # 4 GiB of guest-physical space (reserved lazily, MAP_NORESERVE): the 1-GiB-page environments keep
    # data at 1 GiB, which the backend's default limit would refuse as unsupported.
    return KvmBackend(mem_limit=1 << 32)


_ENTRIES: dict[str, Entry] = {}
_AVAILABILITY: dict[str, tuple[bool, str]] = {}


def register(name: str, factory: Factory, *, description: str = "", replace: bool = False) -> None:
    """Make ``factory`` the constructor of backend ``name``."""
    if not name or any(ch in name for ch in ", =:") or name != name.strip():
        raise RegistryError(f"bad backend name {name!r} (no spaces, commas, '=' or ':')")
    if name in _ENTRIES and not replace:
        raise RegistryError(f"backend {name!r} is registered already")
    _ENTRIES[name] = Entry(name, factory, description)
    _AVAILABILITY.pop(name, None)


def unregister(name: str) -> None:
    _ENTRIES.pop(name, None)
    _AVAILABILITY.pop(name, None)


def names() -> list[str]:
    """Every registered backend name, built-ins first."""
    return list(_ENTRIES)


def entry(name: str) -> Entry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise RegistryError(f"unknown backend {name!r} (known: {', '.join(_ENTRIES)})") from None


def create(name: str) -> Backend:
    """A new instance of backend ``name``."""
    return entry(name).factory()


def availability(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run here, and why not (probed once per process)."""
    if name not in _AVAILABILITY:
        backend = create(name)
        try:
            caps = backend.capabilities()
            _AVAILABILITY[name] = (caps.available, caps.reason)
        finally:
            close = getattr(backend, "close", None)
            if callable(close):
                close()  # the probe's resources (a KVM VM, ...) must not leak into forked workers
    return _AVAILABILITY[name]


def parse(text: str | Sequence[str]) -> list[str]:
    """Backend names from ``"spec,unicorn"`` (or a list of such strings): known, without repeats."""
    parts = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for part in parts:
        for name in part.split(","):
            name = name.strip()
            if not name:
                continue
            entry(name)
            if name not in out:
                out.append(name)
    if not out:
        raise RegistryError("no backends given")
    return out


def load_factory(spec: str) -> Factory:
    """``package.module:attribute`` -> the constructor it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"{ENV_VAR}: {spec!r} is not of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"{ENV_VAR}: cannot import {module_name}: {e}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"{ENV_VAR}: {module_name} has no {attr}") from None
    if not callable(factory):
        raise RegistryError(f"{ENV_VAR}: {spec} is not callable")
    return factory


def load_environment(value: str | None = None) -> list[str]:
    """Register the backends declared in ``REFVMM_BACKENDS`` (or ``value``); their names."""
    text = os.environ.get(ENV_VAR, "") if value is None else value
    added = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, target = item.partition("=")
        if not sep:
            raise RegistryError(f"{ENV_VAR}: {item!r} is not of the form name=package.module:factory")
        register(name.strip(), load_factory(target.strip()), description=f"from {ENV_VAR}: {target.strip()}",
                 replace=True)
        added.append(name.strip())
    return added


def _register_builtins() -> None:
    register("spec", _spec, description="the spec CPU (reference; exceptions not delivered)")
    register("unicorn", _unicorn, description="Unicorn 2 / QEMU TCG, compared up to the first exception")
    register("kvm", _kvm, description="KVM via /dev/kvm: hardware at CPL3, KVM's emulator at CPL0")
    try:
        vmm = importlib.import_module("difftest.backends.refvmm")
    except ModuleNotFoundError as e:
        if e.name != "difftest.backends.refvmm":
            raise
        return
    for name, factory in getattr(vmm, "BACKENDS", {}).items():
        register(name, factory, description=f"refvmm ({name})")


_register_builtins()
