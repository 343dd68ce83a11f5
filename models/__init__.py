"""The reference zoo: one readable file per seed architecture. Importing this package registers them all."""
from . import bigbird, performer  # noqa: F401
from . import deberta  # noqa: F401
from . import evolving  # noqa: F401
from . import flash  # noqa: F401
from . import hypercube  # noqa: F401
from . import mgk  # noqa: F401
from . import spade  # noqa: F401
from . import switch  # noqa: F401
from . import transformer_ls  # noqa: F401
from . import treeformer  # noqa: F401
from . import vit  # noqa: F401
from .registry import ZOO, ZooEntry, get

__all__ = ["ZOO", "ZooEntry", "get"]
