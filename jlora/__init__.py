"""jlora: LoRA fine-tuning for JAX/Flax as transforms of parameter pytrees."""

from jlora.adapters.adapter_set import AdapterSet as AdapterSet
from jlora.adapters.adapter_set import load_adapter_set as load_adapter_set
from jlora.adapters.bank import AdapterBank as AdapterBank
from jlora.adapters.bank import stack_adapters as stack_adapters
from jlora.adapters.convert import convert_to_lora as convert_to_lora
from jlora.adapters.convert import pad_rank as pad_rank
from jlora.adapters.eva import get_eva_state_dict as get_eva_state_dict
from jlora.adapters.eva import init_eva as init_eva
from jlora.adapters.run import apply as apply
from jlora.adapters.run import apply_fn as apply_fn
from jlora.adapters.weighted import add_weighted_adapter as add_weighted_adapter
from jlora.core.config import LoraConfig as LoraConfig
from jlora.core.fields import TaskType as TaskType
from jlora.core.fields import default_target_modules as default_target_modules
from jlora.core.init import init_tree as init_tree
from jlora.core.merge import apply_merged as apply_merged
from jlora.core.merge import dora_norms as dora_norms
from jlora.core.merge import merge as merge
from jlora.core.merge import unmerge as unmerge
from jlora.core.optim import optimizer as optimizer
from jlora.core.sharding import adapter_shardings as adapter_shardings
from jlora.core.summary import Summary as Summary
from jlora.core.summary import summary as summary
from jlora.core.tree import combine as combine
from jlora.core.tree import labels as labels
from jlora.core.tree import split as split
from jlora.core.tree import trainable_mask as trainable_mask
from jlora.formats.checkpoint import load_adapter as load_adapter
from jlora.formats.checkpoint import save_adapter as save_adapter
from jlora.formats.peft.api import load_peft as load_peft
from jlora.formats.peft.api import save_peft as save_peft
from jlora.formats.peft.torch_names import NameMap as NameMap
from jlora.formats.quantized import load_quantized as load_quantized
from jlora.formats.quantized import save_quantized as save_quantized
from jlora.frontends.layers import Layer as Layer
from jlora.frontends.layers import register_layer as register_layer
from jlora.frontends.layers import registered_layers as registered_layers
from jlora.frontends.linen import init as init
from jlora.quant.tree import dequantize as dequantize
from jlora.quant.tree import quantize as quantize
from jlora.quant.tree import requantize as requantize

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "AdapterSet",
    "Layer",
    "LoraConfig",
    "NameMap",
    "Summary",
    "TaskType",
    "adapter_shardings",
    "add_weighted_adapter",
    "apply",
    "apply_fn",
    "apply_merged",
    "combine",
    "convert_to_lora",
    "default_target_modules",
    "dequantize",
    "dora_norms",
    "get_eva_state_dict",
    "init",
    "init_eva",
    "init_tree",
    "labels",
    "load_adapter",
    "load_adapter_set",
    "load_peft",
    "load_quantized",
    "merge",
    "optimizer",
    "pad_rank",
    "quantize",
    "register_layer",
    "registered_layers",
    "requantize",
    "save_adapter",
    "save_peft",
    "save_quantized",
    "split",
    "stack_adapters",
    "summary",
    "trainable_mask",
    "unmerge",
]
