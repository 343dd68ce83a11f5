"""The custom ops: one module per op, each exporting CONTRACT. This registry is what every other part reads."""
from .block_sparse_attention import CONTRACT as BLOCK_SPARSE_ATTENTION
from .contract import DOMAIN, PLUGIN_NAMESPACE, OpContract
from .dense_attention import CONTRACT as DENSE_ATTENTION
from .disentangled_attention import CONTRACT as DISENTANGLED_ATTENTION
from .kernelized_attention import CONTRACT as KERNELIZED_ATTENTION
from .long_convolution import CONTRACT as LONG_CONVOLUTION
from .mixture_of_experts import CONTRACT as MIXTURE_OF_EXPERTS

OPS: dict[str, OpContract] = {op.op_type: op for op in (
    BLOCK_SPARSE_ATTENTION, DENSE_ATTENTION, DISENTANGLED_ATTENTION, KERNELIZED_ATTENTION, LONG_CONVOLUTION,
    MIXTURE_OF_EXPERTS)}


def contract_for(node) -> OpContract | None:
    """The contract of an ONNX node, or None when the node is not one of ours."""
    if node.domain != DOMAIN:
        return None
    return OPS.get(node.op_type)


__all__ = ["OPS", "DOMAIN", "PLUGIN_NAMESPACE", "OpContract", "contract_for", "BLOCK_SPARSE_ATTENTION",
           "DENSE_ATTENTION", "DISENTANGLED_ATTENTION", "KERNELIZED_ATTENTION", "LONG_CONVOLUTION",
           "MIXTURE_OF_EXPERTS"]
