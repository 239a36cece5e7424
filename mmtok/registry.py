"""One generic registry, instantiated once per kind of component.

Every pluggable part of mmtok (tokenizers, quantizers, maskers, MIM models, pruners, segmentation
formats, training tasks, shard builders) lives in a :class:`Registry`. An entry is a callable (a class
or a factory) plus, optionally, a config dataclass. ``create(name, **overrides)`` merges the overrides
into that dataclass and rejects unknown keys with a message that lists the valid ones and suggests the
closest match, so a typo in a YAML file fails before any work starts instead of deep in a constructor.

Example::

    TOKENIZERS = Registry("tokenizer")

    @TOKENIZERS.register("vq_small_f8", config=VQConfig, aliases=("vq_f8",), defaults={"downsample": 8})
    class VQTokenizer(nn.Module):
        def __init__(self, config: VQConfig): ...

    model = TOKENIZERS.create("vq_small_f8", codebook_size=1024)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class RegistryError(KeyError):
    """An unknown name, a duplicate name or an unknown config key."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    target: Callable[..., Any]
    config: type | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    help: str = ""


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def build_config(config_cls: type, overrides: Mapping[str, Any], what: str = "config") -> Any:
    """Instantiate ``config_cls`` (a dataclass) from a mapping, rejecting unknown keys.

    Nested dataclass fields accept mappings. Raises :class:`RegistryError` naming the bad key, the
    valid keys and the closest match.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        key = unknown[0]
        raise RegistryError(
            f"unknown key {key!r} for {what} ({config_cls.__name__}).{_suggest(key, list(fields))} "
            f"Valid keys: {', '.join(sorted(fields))}."
        )
    kwargs = {}
    for key, value in overrides.items():
        ftype = fields[key].type
        nested = _dataclass_type(ftype, config_cls)
        if nested is not None and isinstance(value, Mapping):
            value = build_config(nested, value, what=f"{what}.{key}")
        kwargs[key] = value
    return config_cls(**kwargs)


def _dataclass_type(annotation: Any, owner: type) -> type | None:
    """Resolve a field annotation (possibly a string) to a dataclass type, else None."""
    if isinstance(annotation, str):
        import sys

        module = sys.modules.get(owner.__module__)
        annotation = getattr(module, annotation, None) if module else None
    return annotation if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) else None


class Registry:
    """A named collection of components of one kind.

    Args:
        kind: What the entries are ("tokenizer", "masker", ...); used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        # Callables that import the modules filling this registry, run lazily: a lookup of a name
        # imports providers one at a time until it is found, so building the toy task never pays for
        # importing every tokenizer, MIM and MLLM module. Listing imports them all.
        self._pending: list[Callable[[], None]] = []

    def add_provider(self, load: Callable[[], None]) -> None:
        """Register a callable that imports a module adding entries here (run on demand, once)."""
        self._pending.append(load)

    def _load_next(self) -> bool:
        if not self._pending:
            return False
        self._pending.pop(0)()
        return True

    def load_all(self) -> None:
        """Import every pending provider."""
        while self._load_next():
            pass

    # -- registration -------------------------------------------------------------------------
    def register(
        self,
        name: str,
        config: type | None = None,
        aliases: tuple[str, ...] = (),
        defaults: Mapping[str, Any] | None = None,
        help: str = "",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a class or factory under ``name`` (and ``aliases``).

        ``defaults`` are config values for this entry (one class can serve several sizes).
        """

        def deco(target: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, target, config=config, aliases=aliases, defaults=defaults, help=help)
            return target

        return deco

    def add(
        self,
        name: str,
        target: Callable[..., Any],
        config: type | None = None,
        aliases: tuple[str, ...] = (),
        defaults: Mapping[str, Any] | None = None,
        help: str = "",
    ) -> None:
        for n in (name, *aliases):
            if n in self._entries or n in self._aliases:
                raise RegistryError(f"{self.kind} {n!r} is already registered; pick another name")
        if config is not None and defaults:
            build_config(config, defaults, what=f"defaults of {self.kind} {name!r}")  # validate early
        doc = help or (target.__doc__ or "").strip().split("\n")[0]
        self._entries[name] = Entry(name, target, config, dict(defaults or {}), doc)
        for a in aliases:
            self._aliases[a] = name

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Entry:
        """Return the entry for ``name`` or an alias; unknown names list the valid ones."""
        while name not in self._entries and name not in self._aliases and self._load_next():
            pass
        name = self._aliases.get(name, name)
        if name not in self._entries:
            names = self.list()
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{_suggest(name, names + list(self._aliases))} "
                f"Registered: {', '.join(names) or '(none)'}."
            )
        return self._entries[name]

    def list(self, pattern: str | None = None) -> list[str]:
        """Registered names (not aliases), sorted; ``pattern`` is an fnmatch filter."""
        import fnmatch

        self.load_all()
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    def __contains__(self, name: str) -> bool:
        while name not in self._entries and name not in self._aliases and self._load_next():
            pass
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        self.load_all()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"

    # -- construction -------------------------------------------------------------------------
    def build_config(self, name: str, **overrides: Any) -> Any:
        """The entry's config dataclass with its defaults and ``overrides`` applied."""
        entry = self.get(name)
        if entry.config is None:
            raise RegistryError(f"{self.kind} {entry.name!r} has no config class")
        return build_config(entry.config, {**entry.defaults, **overrides}, what=f"{self.kind} {entry.name!r}")

    def create(self, name: str, *args: Any, **overrides: Any) -> Any:
        """Build the component ``name``.

        With a config class, ``overrides`` are merged into it (unknown keys rejected) and the target is
        called as ``target(config, *args)``. Without one, ``target(*args, **defaults, **overrides)``.
        """
        entry = self.get(name)
        if entry.config is not None:
            obj = entry.target(self.build_config(name, **overrides), *args)
        else:
            obj = entry.target(*args, **{**entry.defaults, **overrides})
        if hasattr(obj, "hub_name"):  # lets hub.save_pretrained record which entry rebuilds it
            obj.hub_name = entry.name
        return obj
