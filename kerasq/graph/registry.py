"""A class-keyed registry whose entries can be undone or scoped, shared by every kerasq registry.

Example:
>>> import keras
>>> from kerasq.graph.registry import ClassRegistry
>>> registry = ClassRegistry("example facts")
>>> with registry.register(keras.layers.Dense, "dense facts"):
...     registry.lookup(keras.layers.Dense(2))
'dense facts'
>>> registry.lookup(keras.layers.Dense(2)) is None
True
"""


class Registration:
    """What `ClassRegistry.register` returns: `undo()` restores the previous entry; as a context
    manager, the entry lasts for the `with` block only."""

    def __init__(self, registry, key, previous):
        self._registry, self._key, self._previous = registry, key, previous
        self._undone = False

    def undo(self):
        if self._undone:
            return
        self._undone = True
        entries = self._registry._entries
        if self._previous is _MISSING:
            entries.pop(self._key, None)
        else:
            entries[self._key] = self._previous

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.undo()


class ClassRegistry:
    """Maps classes to entries. `lookup(obj)` walks `type(obj).__mro__`, so subclasses share their
    base class's entry unless `inherits(obj_class, registered_class)` says they should not."""

    def __init__(self, what, inherits=None):
        self.what = what
        self._entries = {}
        self._inherits = inherits or (lambda cls, base: True)

    def register(self, cls, entry):
        if not isinstance(cls, type):
            raise TypeError(f"{self.what}: expected a class; got {cls!r}.")
        previous = self._entries.get(cls, _MISSING)
        self._entries[cls] = entry
        return Registration(self, cls, previous)

    def lookup(self, obj):
        """The entry for `obj`'s class (or the closest registered base class), or None."""
        cls = type(obj)
        for base in cls.__mro__:
            entry = self._entries.get(base, _MISSING)
            if entry is not _MISSING:
                return entry if base is cls or self._inherits(cls, base) else None
        return None

    def __contains__(self, cls):
        return cls in self._entries


_MISSING = object()
