"""A registry of stage backends by name, for generators and annotators alike.

A backend is a module (imported on first use, so that the cheap ones never load torch) or any
object with the same attributes:

- ``STAGE``: the stage class (load in ``__init__``, transform one batch in ``__call__``);
- ``build(section, **context)``: the stage from its config section, a plain mapping (the
  ``generation`` or ``annotation`` section as a dict; keys of a backend outside the built-in
  set go in the section's ``options`` mapping); ``context`` is what the pipeline knows besides
  the section (``categories`` for generators);
- ``OPTIONS`` (optional): the names of its keys in the section's ``options`` mapping (the
  config refuses an ``options`` key that no backend or check claims);
- ``check_section(section)`` (optional): the problems of the section's keys that this backend
  reads, as ``"section.key: what is wrong and the fix"`` lines, checked when the config loads;
- ``check_weights(section, report)`` (optional): the up-front check of the weights it will
  load; ``report`` has ``add(key, message)``, ``passed`` and ``warnings`` lists
  (`pipeline.run.preflight.PreflightReport`).

This is segment-anything's ``sam_model_registry`` pattern: one table, the builders beside the
code they build. A new backend is one module plus one line in its package's table; a
`BackendRegistry.register` call made elsewhere reaches only the process that makes it (a test,
not the Ray actors of a run).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any


class BackendRegistry:
    """Backends of one kind (``"generator"``, ``"annotator"``) by name.

    Args:
        kind: what the backends are, for errors.
        section: the config section naming them (``"generation"``), for errors.
        modules: built-in backend name → module path.
    """

    def __init__(self, kind: str, section: str, modules: Mapping[str, str]) -> None:
        self.kind = kind
        self.section = section
        self._entries: dict[str, Any] = dict(modules)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def register(self, name: str, backend: Any) -> None:
        """Add a backend: a module path, or an object with ``STAGE`` and ``build``."""
        if not isinstance(backend, str) and not hasattr(backend, "build"):
            raise TypeError(f"{self.kind} backend {name!r} has no build(section, ...)")
        self._entries[name] = backend

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def unknown(self, name: str, extra: tuple[str, ...] = ()) -> str:
        """The error line for a name that is not registered (with the closest one)."""
        names = (*self.names(), *extra)
        close = difflib.get_close_matches(str(name), names, n=1)
        article = "an" if self.kind[0] in "aeiou" else "a"
        return (f"{self.section}.backend: {name!r} is not {article} {self.kind} backend; use "
                f"one of {list(names)}" + (f" (did you mean {close[0]!r}?)" if close else ""))

    def get(self, name: str) -> Any:
        """The backend (its module imported now); ValueError for an unknown name."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = importlib.import_module(entry)
        return entry

    def build(self, name: str, section: Mapping[str, Any], **context: Any) -> Any:
        """The stage of backend ``name`` built from its config ``section``."""
        return self.get(name).build(section, **context)

    def check_section(self, name: str, section: Mapping[str, Any]) -> list[str]:
        """The section's problems as the backend sees them (none when it checks nothing)."""
        check = getattr(self.get(name), "check_section", None)
        return list(check(section)) if check is not None else []

    def options(self, name: str) -> tuple[str, ...]:
        """The ``options`` keys backend ``name`` claims (``OPTIONS``)."""
        return tuple(getattr(self.get(name), "OPTIONS", ()))

    def check_weights(self, name: str, section: Mapping[str, Any], report: Any) -> None:
        check = getattr(self.get(name), "check_weights", None)
        if check is not None:
            check(section, report)


def options(section: Mapping[str, Any]) -> dict[str, Any]:
    """The section's ``options`` mapping (keys of a backend outside the built-in set)."""
    value = section.get("options") or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"options must be a mapping of key to value, got {value!r}")
    return dict(value)
