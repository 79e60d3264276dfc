"""Name -> class registries (projector catalogs, encoder kinds); pure Python, so the
PyTorch side (``torch_port``, no JAX) shares it."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Classes registered under unique names; unknown names are errors that list the known."""

  def __init__(self, what: str):
    self.what = what            # e.g. "projector", used in error messages
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def wrap(entry: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.what} {name!r} registered twice")
      self._entries[name] = entry
      return entry
    return wrap

  def names(self) -> list[str]:
    return sorted(self._entries)

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}")
    return self._entries[name]

  def name_of(self, entry: T) -> str | None:
    return next((n for n, e in self._entries.items() if e is entry), None)
