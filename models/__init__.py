"""The reference zoo: one readable file per seed architecture. Importing this package registers them all."""
from . import bigbird, performer  # noqa: F401
from .registry import ZOO, ZooEntry, get

__all__ = ["ZOO", "ZooEntry", "get"]
