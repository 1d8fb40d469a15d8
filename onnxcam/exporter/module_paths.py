"""Module paths in ONNX files torch wrote: which module made each node, and which tensor
is each module's output, so a layer can be named as in the model (``layer4.1``).

torch's dynamo exporter lists a node's module scopes in its metadata
(``pkg.torch.onnx.name_scopes``: ``['', 'layer4', 'layer4.1', 'layer4.1.relu', 'relu_16']``,
the model first and the node's own name last). The TorchScript exporter
(``dynamo=False``) writes them into the node's name instead
(``/layer4/layer4.1/relu_1/Relu``), each folder the module's unqualified name: its last
attribute with any list indices after it (``downsample.0``, ``features.7.1``), and a
module called a second time gets ``_1`` (``relu_1``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
TORCH_PRODUCER = "pytorch"


def module_outputs(graph: onnx.GraphProto, legacy_names: bool,
                   floats: set[str]) -> dict[str, list[str]]:
    """Each module path's output tensors, in graph order, among ``floats``.

    A module's output is a tensor made inside its scope and read outside it (or
    returned by the graph): one for a module called once, one per call for a module
    called several times under one scope (dynamo names every call of ResNet's
    shared ``relu`` ``layer4.1.relu``). Readers of unknown scope do not count: the
    TorchScript exporter adds unscoped ``Shape`` nodes that read tensors deep inside
    a block (Swin's attention mask). ``legacy_names`` reads scopes from node names
    (only for files torch wrote: other tools' names are no module paths).
    Precondition: ``graph`` is topologically sorted.
    """
    # By position: protobuf hands out a new wrapper per access, and id() of a freed one
    # is reused, so ids of graph.node's items are no keys.
    nodes = list(graph.node)
    scopes = [node_scope(node, legacy_names) for node in nodes]
    readers: dict[str, list[str]] = {}
    for node, reader in zip(nodes, scopes):
        for name in node.input:
            if reader is not None:
                readers.setdefault(name, []).append(reader)
    returned = {output.name for output in graph.output}
    found: dict[str, list[str]] = {}
    for node, scope in zip(nodes, scopes):
        tensor = node.output[0] if node.output else ""
        if not scope or tensor not in floats:
            continue
        read_by = readers.get(tensor, [])
        for path in enclosing(scope):
            if tensor in returned or any(not inside(reader, path) for reader in read_by):
                found.setdefault(path, []).append(tensor)
    return found


def paths_by_tensor(outputs: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """The module paths whose output each tensor is, outermost first."""
    by_tensor: dict[str, list[str]] = {}
    for path, tensors in outputs.items():
        for tensor in tensors:
            by_tensor.setdefault(tensor, []).append(path)
    return {tensor: tuple(sorted(paths, key=lambda p: (p.count("."), p)))
            for tensor, paths in by_tensor.items()}


def node_scope(node: onnx.NodeProto, legacy_names: bool) -> str | None:
    """The path of the innermost module that made ``node``: '' for the model itself,
    None where the file does not say."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            return dynamo_scope(prop.value)
    if legacy_names and node.name.startswith("/"):
        return legacy_scope(node.name)
    return None


def dynamo_scope(value: str) -> str:
    """The innermost module of a ``name_scopes`` list (its last entry is the node)."""
    try:
        scopes = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(scopes, list) or len(scopes) < 2:
        return ""
    return str(scopes[-2])


def legacy_scope(name: str) -> str:
    """The module path in a TorchScript exporter's node name.

    A folder is written as the module's path from its parent's scope, and repeats the
    atoms it shares with the end of the parent's path: ``layer3.0`` + ``downsample.0``
    is ``layer3.0.downsample.0``, ``features`` + ``features.7`` is ``features.7``. A
    module reached through a container that is never called (a ``ModuleList``) repeats
    nothing: ``backbone`` + ``features.1`` is ``backbone.features.1`` (torchvision's SSD).
    """
    atoms: list[str] = []
    for folder in name.split("/")[1:-1]:
        part = folder.split(".")
        shared = next((k for k in range(len(part) - 1, 0, -1) if atoms[-k:] == part[:k]), 0)
        atoms = atoms[:len(atoms) - shared] + part
    return ".".join(atoms)


def enclosing(scope: str) -> Iterable[str]:
    """``scope`` and every module around it: ``layer4``, ``layer4.1``, ``layer4.1.relu``."""
    atoms = scope.split(".")
    return (".".join(atoms[: i + 1]) for i in range(len(atoms)))


def inside(scope: str, path: str) -> bool:
    """Whether a node of module ``scope`` runs inside module ``path``."""
    return scope == path or scope.startswith(path + ".")
