"""Graph passes that fuse attention into custom ops; `fuse_graph` runs them all and reports per model layer."""
from .framework import FAMILY_PASSES, NotFused
from .fusion import fuse_graph
from .fusion_report import FusionReport, LayerResult, ModelLayer, layer_name

__all__ = ["fuse_graph", "FusionReport", "LayerResult", "ModelLayer", "layer_name", "FAMILY_PASSES", "NotFused"]
