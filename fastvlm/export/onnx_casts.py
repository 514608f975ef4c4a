"""Cast hygiene for ONNX graphs after fp16 conversion: the casts every runtime accepts.

ONNX Runtime's float16 converter (`keep_io_types=True`, `node_block_list`) leaves casts that are
valid ONNX but trip optimizers of other runtime builds. The class that broke transformers.js
(onnxruntime-node 1.30): a fp16 → fp32 Cast right after a Transpose whose output is both a graph
output and a MatMul input. CSE merges the converter's duplicate casts into that shape, then
`MatmulTransposeFusion` reorders Cast and Transpose without keeping the graph output's producer
and the session segfaults. `tidy_casts` rewrites every graph into a shape without such chains:

* identical casts of one tensor are merged (the one naming a graph output survives);
* a Cast after precision-free layout ops (Transpose, Reshape, ...) moves above them, so layout
  ops never sit between a Cast and its consumers: nothing is left for an optimizer to reorder;
* a float → fp16 → float round trip the converter puts on a blocked node's output is dropped
  (it only lost precision);
* nodes are sorted topologically (the converter appends its input casts at the end).
"""

from __future__ import annotations

from collections import defaultdict

# ops that only move or relabel elements: Cast(op(x)) == op(Cast(x)); extra inputs are int64
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
FLOAT16, FLOAT, DOUBLE = 10, 1, 11
GRAPH_ATTRS = (5, 10)  # AttributeProto.GRAPH / GRAPHS: control flow reads outer names


def _cast_to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _consumers(graph) -> dict[str, list]:
    out = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def _rename_uses(graph, old: str, new: str) -> None:
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new


def _drop_value_info(graph, name: str) -> None:
    for v in list(graph.value_info):
        if v.name == name:
            graph.value_info.remove(v)


def merge_duplicate_casts(graph) -> bool:
    """Casts of the same tensor to the same type → one Cast."""
    outputs = {o.name for o in graph.output}
    groups = defaultdict(list)
    for n in graph.node:
        if n.op_type == "Cast" and len(n.input) == 1:
            groups[(n.input[0], _cast_to(n))].append(n)
    changed = False
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        named = [n for n in nodes if n.output[0] in outputs]
        if len(named) > 1:  # two graph outputs need two producers
            nodes = [n for n in nodes if n.output[0] not in outputs] + named[:1]
            if len(nodes) < 2:
                continue
        keep = named[0] if named else nodes[0]
        for n in nodes:
            if n is not keep:
                _rename_uses(graph, n.output[0], keep.output[0])
                _drop_value_info(graph, n.output[0])
                graph.node.remove(n)
                changed = True
    return changed


def hoist_casts(graph) -> bool:
    """Cast(layout(x)) → layout(Cast(x)) while the layout op's output feeds only that Cast."""
    outputs = {o.name for o in graph.output}
    changed = True
    moved = False
    while changed:
        changed = False
        producer = {o: n for n in graph.node for o in n.output}
        consumers = _consumers(graph)
        for cast in graph.node:
            if cast.op_type != "Cast":
                continue
            x = cast.input[0]
            op = producer.get(x)
            if (op is None or op.op_type not in LAYOUT_OPS or x in outputs
                    or len(consumers[x]) != 1 or len(op.output) != 1):  # fmt: skip
                continue
            hoisted = cast.output[0] + "_hoisted"
            cast.input[0], cast.output[0], op.input[0], op.output[0] = (
                op.input[0], hoisted, hoisted, cast.output[0])  # fmt: skip
            _drop_value_info(graph, x)
            changed = moved = True
            break
    return moved


def drop_fp16_round_trips(graph) -> bool:
    """Cast(to=fp16) whose only consumer casts to fp32 / fp64: the second reads the source
    directly (a cast to an integer type keeps the fp16 step: its rounding is part of the result)."""
    outputs = {o.name for o in graph.output}
    consumers = _consumers(graph)
    changed = False
    for first in list(graph.node):
        if first.op_type != "Cast" or _cast_to(first) != FLOAT16 or first.output[0] in outputs:
            continue
        users = consumers[first.output[0]]
        if len(users) != 1 or users[0].op_type != "Cast":
            continue
        if _cast_to(users[0]) not in (FLOAT, DOUBLE):
            continue
        users[0].input[0] = first.input[0]
        _drop_value_info(graph, first.output[0])
        graph.node.remove(first)
        consumers = _consumers(graph)
        changed = True
    return changed


def topo_sort(graph) -> None:
    """Stable topological order (Kahn): the ONNX checker and some loaders require it."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes, order = list(graph.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):  # a cycle or a dangling input: leave the order alone
            return
        nodes = rest
    del graph.node[:]
    graph.node.extend(order)


def tidy_casts(model):
    """All rewrites above on the main graph of `model` (in place); returns `model`. Graphs with
    control flow are left alone: their subgraphs may read the names these rewrites change."""
    g = model.graph
    if any(a.type in GRAPH_ATTRS for n in g.node for a in n.attribute):
        return model
    while merge_duplicate_casts(g) | hoist_casts(g) | drop_fp16_round_trips(g):
        pass
    topo_sort(g)
    return model
