"""Reading and copying ONNX nodes: attributes, labels, subgraph bodies."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import AttributeProto, helper

__all__ = ["DEFAULT_DOMAINS", "AttributeRef", "get_attr", "node_label", "replace_node", "attr_graphs", "is_default"]

#: The two spellings of the default ONNX operator domain.
DEFAULT_DOMAINS = ("", "ai.onnx")


class AttributeRef(Exception):
    """An attribute of a function body node refers to a function attribute (value unknown).

    Raised by `get_attr`; the pass turns it into a `Skip`.
    """


def is_default(node: onnx.NodeProto) -> bool:
    """True if ``node`` is an operator of the default ONNX domain."""
    return node.domain in DEFAULT_DOMAINS


def get_attr(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute ``name`` of ``node`` (``default`` if absent)."""
    for attr in node.attribute:
        if attr.name == name:
            if attr.ref_attr_name:
                raise AttributeRef(name)
            return helper.get_attribute_value(attr)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """The node's name, or ``<OpType -> first output>`` for unnamed nodes."""
    if node.name:
        return node.name
    first = node.output[0] if len(node.output) else "?"
    return f"<{node.op_type} -> {first}>"


def replace_node(
    node: onnx.NodeProto,
    *,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    attrs: dict | None = None,
    drop_attrs: Iterable[str] = (),
    op_type: str | None = None,
) -> onnx.NodeProto:
    """A copy of ``node`` (same name, domain, doc string) with some fields replaced.

    ``attrs`` maps attribute names to new values (set or overwritten); ``drop_attrs`` removes
    attributes. The original node is not modified.
    """
    new = onnx.NodeProto()
    new.CopyFrom(node)
    if op_type is not None:
        new.op_type = op_type
    if inputs is not None:
        del new.input[:]
        new.input.extend(inputs)
    if outputs is not None:
        del new.output[:]
        new.output.extend(outputs)
    drop = set(drop_attrs) | set(attrs or {})
    if drop:
        kept = [a for a in new.attribute if a.name not in drop]
        del new.attribute[:]
        new.attribute.extend(kept)
    for key, value in (attrs or {}).items():
        new.attribute.append(helper.make_attribute(key, value))
    return new


def attr_graphs(attr: AttributeProto) -> list[onnx.GraphProto]:
    """The subgraph bodies held by a node attribute (If branches, Loop / Scan bodies)."""
    if attr.type == AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []
