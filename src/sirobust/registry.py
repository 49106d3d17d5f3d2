"""Names → objects: the one registry class behind attacks, losses, defenses, models and datasets.

A :class:`Registry` maps canonical names to entries (classes, builders, records). Lookups are
case-insensitive, treat ``_`` as ``-``, accept aliases and fail with a did-you-mean and the whole
list (:func:`sirobust.checks.resolve_name`). A name is registered once: a second registration of
the same name, or of a name an alias already means, is refused. Names are resolved here, at the
edge, and nowhere deeper (DESIGN.md, habit 2).

Example::

    LOSSES = Registry("loss")
    LOSSES.register("ce", ce)             # or @LOSSES.decorator("ce")
    LOSSES.get("CE")                      # the entry; LOSSES.canonical("CE") == "ce"
    LOSSES.describe("ce")                 # the first line of its docstring
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Callable, Generic, Iterator, Mapping, Optional, TypeVar

from .checks import UnknownNameError, resolve_name

T = TypeVar("T")
_REQUIRED = object()


def first_doc_line(obj) -> str:
    """The first paragraph of ``obj``'s docstring on one line ("" when it has none): a sentence that goes on to
    a second line is not cut in the middle (``sirobust list`` printed "... a random step α·sign(N(0, I)), then")."""
    paragraph = (obj.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


class Registry(MutableMapping, Generic[T]):
    """Canonical name → entry, for one ``kind`` of thing ("attack", "loss", ...).

    It reads as a dict of its canonical names (``registry["pgd"]``, ``sorted(registry)``); assigning a new
    name registers it, so ``monkeypatch.setitem`` works, and assigning a taken name is refused.
    ``describe(entry)`` gives the one line :meth:`describe` returns (default: the first line of its docstring).
    """

    def __init__(self, kind: str, entries: Optional[Mapping[str, T]] = None,
                 aliases: Optional[Mapping[str, str]] = None, describe: Callable[[T], str] = first_doc_line):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._describe = describe
        for name, entry in (entries or {}).items():
            self.register(name, entry)
        for alias, target in (aliases or {}).items():
            self.alias(alias, target)

    # ------------------------------------------------------------------ registration

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a name (or alias) already taken is refused."""
        if self._taken(name):
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("resnet18")`` registers the decorated object under that name."""
        return lambda entry: self.register(name, entry)

    def alias(self, alias: str, target: str) -> None:
        """Let ``alias`` mean the registered ``target``."""
        if target not in self._entries:
            raise ValueError(f"alias {alias!r} names {target!r}, which is not a registered {self.kind}")
        if self._taken(alias):
            raise ValueError(f"{self.kind} alias {alias!r} is already a name or an alias")
        self._aliases[alias] = target

    def _taken(self, name: str) -> bool:
        """Whether ``name``, in any spelling lookups accept, already means something here."""
        return self.get(name, None) is not None

    # ------------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        """The canonical names, sorted."""
        return sorted(self._entries)

    def canonical(self, name: str) -> str:
        """The registry's spelling of ``name``; an unknown name raises :class:`~sirobust.checks.UnknownNameError`."""
        return resolve_name(self.kind, name, self._entries, self._aliases)

    def get(self, name: str, default=_REQUIRED) -> T:  # type: ignore[override]
        """The entry ``name`` (any accepted spelling) stands for; an unknown name returns ``default`` when one is
        given (as ``dict.get`` does), else raises :class:`~sirobust.checks.UnknownNameError`."""
        if default is _REQUIRED:
            return self._entries[self.canonical(name)]
        try:
            return self._entries[self.canonical(name)]
        except (UnknownNameError, TypeError):
            return default

    def aliases(self) -> dict[str, str]:
        """Alias → canonical name (a copy)."""
        return dict(self._aliases)

    def describe(self, name: str) -> str:
        """One line saying what ``name`` is (by default the first line of its docstring)."""
        return self._describe(self.get(name))

    # ------------------------------------------------------------------ the mapping of canonical names

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._aliases = {a: t for a, t in self._aliases.items() if t != name}

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
