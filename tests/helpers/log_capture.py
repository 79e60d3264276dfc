"""Collects warnings logged while a module-scoped fixture runs (pytest's caplog is per test)."""
import logging


class CollectWarnings(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())
