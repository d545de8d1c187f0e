"""ComfyUI nodes of the pack: thin translators from node inputs to engine calls."""
from typing_extensions import override

from ._api import ComfyExtension, io


class PersonalizeExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .controlnet import NODES as controlnet_nodes
        from .dataset import NODES as dataset_nodes
        from .distributed import NODES as distributed_nodes
        from .dreambooth import NODES as dreambooth_nodes
        from .hypernetwork import NODES as hypernetwork_nodes
        from .ipadapter import NODES as ipadapter_nodes
        from .lora_io import NODES as lora_io_nodes
        from .lora_tools import NODES as lora_tools_nodes
        from .merge import NODES as merge_nodes
        from .previews import NODES as preview_nodes
        from .textual_inversion import NODES as textual_inversion_nodes
        from .train import NODES as train_nodes

        return [*dataset_nodes, *train_nodes, *lora_io_nodes, *merge_nodes, *lora_tools_nodes, *hypernetwork_nodes, *textual_inversion_nodes, *preview_nodes, *ipadapter_nodes, *controlnet_nodes, *distributed_nodes, *dreambooth_nodes]
