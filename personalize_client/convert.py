"""UI-format workflows to API format, with the server's `/object_info` as the schema.

What the ComfyUI frontend does on Queue, hand-written here because no Python library does it
(the frontend's `graphToPrompt` is TypeScript):
- widget values are stored by position in `widgets_values`, in the node's input order; an INT
  with `control_after_generate` (or, by the frontend's legacy rule, named seed/noise_seed) stores
  one more value (fixed/randomize...) and uploads (`image_upload`) store one more too;
- a widget converted to an input keeps its slot in `widgets_values`; when linked, the link wins;
- frontend-only nodes disappear: Reroute (followed), PrimitiveNode (its value is inlined), notes;
  muted nodes (mode 2) are dropped and bypassed nodes (mode 4) pass their matching input through.
"""
from __future__ import annotations

import itertools
import json

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
LEGACY_SEED_NAMES = ("seed", "noise_seed")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
VIRTUAL_NODES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}  # frontend-only: never sent to the server
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted or changed as asked; the message says what to do."""


def is_api_format(workflow: dict) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(v, dict) and "class_type" in v for k, v in workflow.items() if not k.startswith("_"))


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def _options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not _options(spec).get("forceInput")


def _value_slots(name: str, spec, legacy_seed: bool) -> int:
    """How many `widgets_values` entries an input's widget takes (0 for sockets)."""
    if not _is_widget(spec):
        return 0
    options = _options(spec)
    control = options.get("control_after_generate")
    if control is None and legacy_seed:
        control = spec[0] == "INT" and name in LEGACY_SEED_NAMES
    return 1 + bool(control) + any(bool(options.get(flag)) for flag in UPLOAD_FLAGS)


def _input_specs(info: dict) -> list[tuple[str, list]]:
    inputs = info.get("input", {})
    specs = {**inputs.get("required", {}), **inputs.get("optional", {})}
    order = info.get("input_order") or {k: list(inputs.get(k, {})) for k in ("required", "optional")}
    return [(name, specs[name]) for name in order.get("required", []) + order.get("optional", []) if name in specs]


def _links(ui: dict) -> dict[int, tuple]:
    """link id -> (origin id, origin slot, target id, target slot, type); list or object links."""
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            out[link[0]] = tuple(link[1:6])
    return out


def _widget_values(node: dict, specs, legacy_seed: bool) -> dict:
    """{input name: value} of the widget inputs of a node, from its positional `widgets_values`."""
    values = node.get("widgets_values")
    if isinstance(values, dict):  # some packs store widgets by name
        return {name: values[name] for name, spec in specs if _is_widget(spec) and name in values}
    values = list(values or [])
    out, position = {}, 0
    for name, spec in specs:
        slots = _value_slots(name, spec, legacy_seed)
        if slots and position < len(values):
            out[name] = values[position]
        position += slots
    return out


def _pick_legacy_rule(node: dict, specs) -> bool:
    """The frontend's own check: use the legacy seed rule unless only the strict count fits."""
    values = node.get("widgets_values")
    if not isinstance(values, list):
        return True
    legacy = sum(_value_slots(n, s, True) for n, s in specs)
    strict = sum(_value_slots(n, s, False) for n, s in specs)
    return not (len(values) == strict and legacy != strict)


class _Graph:
    def __init__(self, ui: dict, object_info: dict):
        if ui.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("this workflow uses subgraphs; unpack them in the ComfyUI editor (or export the API "
                                "format with 'Export (API)') and try again.")
        self.nodes = {n["id"]: n for n in ui["nodes"]}
        self.links = _links(ui)
        self.object_info = object_info

    def source(self, link_id, wanted_type=None, seen=()):
        """What feeds a link after frontend-only and bypassed nodes: ("link", [id, slot]),
        ("value", v) from a PrimitiveNode, or None (muted or unconnected)."""
        if link_id is None or link_id not in self.links or link_id in seen:
            return None
        origin_id, origin_slot, _, _, link_type = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            return None
        seen = (*seen, link_id)
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if kind == "Reroute":
            return self.source(self._input_link(origin, 0), wanted_type or link_type, seen)
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            return self.source(self._bypass_input(origin, origin_slot, wanted_type or link_type), wanted_type, seen)
        return ("link", [str(origin_id), origin_slot])

    @staticmethod
    def _input_link(node, index):
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    @staticmethod
    def _bypass_input(node, slot, link_type):
        # The frontend passes a bypassed node's input of the same type through, preferring the same index.
        inputs = node.get("inputs") or []
        candidates = ([inputs[slot]] if slot < len(inputs) else []) + inputs
        for item in candidates:
            if item.get("link") is not None and (link_type in (None, "*") or item.get("type") in (link_type, "*")):
                return item["link"]
        return None


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (the editor's Save) into the API prompt `POST /prompt` takes."""
    if not is_ui_format(ui):
        raise WorkflowError("not a UI-format workflow (no `nodes`/`links`).")
    graph = _Graph(ui, object_info)
    prompt = {}
    for node_id, node in sorted(graph.nodes.items(), key=lambda kv: kv[1].get("order", 0)):
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {node_id} ({kind}) is not installed on the server: install its custom node "
                                "pack there, or remove the node.")
        specs = _input_specs(info)
        values = _widget_values(node, specs, _pick_legacy_rule(node, specs))
        linked = {}
        for item in node.get("inputs") or []:
            name = (item.get("widget") or {}).get("name") or item.get("name")
            if item.get("link") is not None:
                linked[name] = item
        inputs = {}
        for name, _ in specs:
            if name in linked:
                fed = graph.source(linked[name]["link"], linked[name].get("type"))
                if fed is not None:
                    inputs[name] = fed[1]
                    continue
            if name in values:
                inputs[name] = values[name]
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return prompt


def node_titles(workflow: dict) -> dict[str, str]:
    """{node id: title} of a UI-format (title) or API-format (`_meta.title`) workflow."""
    if is_ui_format(workflow):
        return {str(n["id"]): n.get("title") or "" for n in workflow["nodes"] if n.get("title")}
    return {k: (v.get("_meta") or {}).get("title", "") for k, v in workflow.items() if isinstance(v, dict)}


def parse_value(text: str):
    """JSON when it parses (numbers, true/false, lists, quoted strings), else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_node(prompt: dict, ref: str, titles: dict[str, str]) -> str:
    """A node id from an id, a unique title or a unique class_type."""
    if ref in prompt:
        return ref
    for what, match in (("title", lambda k: titles.get(k) == ref), ("class_type", lambda k: prompt[k]["class_type"] == ref)):
        hits = [k for k in prompt if match(k)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"`{ref}` matches several nodes by {what} ({', '.join(hits)}): use the node id.")
    raise WorkflowError(f"no node `{ref}` in the workflow: use a node id, title or class type "
                        f"(ids: {', '.join(sorted(prompt, key=_id_key))}).")


def _id_key(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def apply_override(prompt: dict, target: str, value, titles: dict[str, str], object_info: dict | None = None) -> str:
    """Set `NODE.INPUT` (or a bare `INPUT` that exactly one node has) to `value`; return 'id.input'."""
    if "." in target:
        ref, name = target.rsplit(".", 1)
        candidates = [find_node(prompt, ref, titles)]
    else:
        name = target
        candidates = [k for k, v in prompt.items() if name in v["inputs"]]
        if object_info:
            candidates = candidates or [k for k, v in prompt.items()
                                        if name in dict(_input_specs(object_info.get(v["class_type"], {})))]
        if len(candidates) != 1:
            found = ", ".join(f"{k}.{name}" for k in candidates) or "none"
            raise WorkflowError(f"`{target}`: {'several' if candidates else 'no'} nodes have this input ({found}); "
                                "write NODE.INPUT.")
    node_id = candidates[0]
    node = prompt[node_id]
    known = set(node["inputs"])
    if object_info and node["class_type"] in object_info:
        known |= {n for n, _ in _input_specs(object_info[node["class_type"]])}
    if name not in known:
        raise WorkflowError(f"`{target}`: node {node_id} ({node['class_type']}) has no input `{name}` "
                            f"(inputs: {', '.join(sorted(known))}).")
    if isinstance(node["inputs"].get(name), list) and len(node["inputs"][name]) == 2 and not isinstance(value, list):
        raise WorkflowError(f"`{target}` is connected to node {node['inputs'][name][0]}; disconnect it in the workflow "
                            "to set a value.")
    node["inputs"][name] = value
    return f"{node_id}.{name}"


def sweep_grid(sweeps: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the sweep values: [{target: value, ...}, ...] (first sweep varies slowest)."""
    if not sweeps:
        return [{}]
    names = [name for name, _ in sweeps]
    return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in sweeps))]
