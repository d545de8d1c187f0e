"""The UI-format example workflow is the same graph as its API twin (read with the server's /object_info),
and every node of the pack has a valid schema."""
import json

import pytest

from workflows import LORA_API, LORA_UI

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to API format the way the frontend does (links + widget order)."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", []) + order.get("optional", [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in names:
            spec = specs[name]
            kind = spec[0]
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                if is_widget:
                    values.pop(0)
            elif is_widget:
                inputs[name] = values.pop(0)
                control = spec[1].get("control_after_generate") if len(spec) > 1 else None
                if control or (control is None and kind == "INT" and name in ("seed", "noise_seed")):  # the frontend's legacy rule
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.server
def test_ui_workflow_is_the_api_twin(comfy_server):
    ui = json.loads(LORA_UI.read_text())
    api = json.loads(LORA_API.read_text())
    assert ui_to_api(ui, comfy_server.object_info()) == api


def test_every_pack_node_has_a_valid_schema(comfy_runtime):
    comfy_runtime.assert_pack_loaded()
    ids = comfy_runtime.pack_node_ids()
    assert {"PersonalizeDatasetFromFolder", "PersonalizeTrainLoRA", "PersonalizeSaveLoRA"} <= set(ids)
    for node_id in ids:
        cls = comfy_runtime.nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        assert node_id.startswith("Personalize") and schema.category.startswith("personalize/")
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"
        for item in schema.outputs:
            assert item.tooltip, f"{node_id} output {item.display_name} has no tooltip"
