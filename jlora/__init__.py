"""jlora: LoRA fine-tuning for JAX/Flax as transforms of parameter pytrees."""

from jlora._adapter_set import AdapterSet as AdapterSet
from jlora._adapter_set import load_adapter_set as load_adapter_set
from jlora._apply_fn import lora_apply as lora_apply
from jlora._bank import AdapterBank as AdapterBank
from jlora._bank import apply_bank as apply_bank
from jlora._bank import bank_apply as bank_apply
from jlora._bank import stack_adapters as stack_adapters
from jlora._config import LoraConfig as LoraConfig
from jlora._fields import TaskType as TaskType
from jlora._init import init_tree as init_tree
from jlora._layers import Layer as Layer
from jlora._layers import register_layer as register_layer
from jlora._linen import apply as apply
from jlora._linen import init as init
from jlora._merge import apply_merged as apply_merged
from jlora._merge import dora_norms as dora_norms
from jlora._merge import merge as merge
from jlora._merge import unmerge as unmerge
from jlora._optim import optimizer as optimizer
from jlora._peft import load_peft as load_peft
from jlora._peft import save_peft as save_peft
from jlora._quant_io import load_quantized as load_quantized
from jlora._quant_io import save_quantized as save_quantized
from jlora._quant_tree import dequantize as dequantize
from jlora._quant_tree import quantize as quantize
from jlora._quant_tree import requantize as requantize
from jlora._sharding import adapter_shardings as adapter_shardings
from jlora._summary import Summary as Summary
from jlora._summary import summary as summary
from jlora._tree import combine as combine
from jlora._tree import labels as labels
from jlora._tree import split as split
from jlora._tree import trainable_mask as trainable_mask
from jlora._weighted import add_weighted_adapter as add_weighted_adapter
from jlora.checkpoint import load_adapter as load_adapter
from jlora.checkpoint import save_adapter as save_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "AdapterSet",
    "Layer",
    "LoraConfig",
    "Summary",
    "TaskType",
    "adapter_shardings",
    "add_weighted_adapter",
    "apply",
    "apply_bank",
    "apply_merged",
    "bank_apply",
    "combine",
    "dequantize",
    "dora_norms",
    "init",
    "init_tree",
    "labels",
    "load_adapter",
    "load_adapter_set",
    "load_peft",
    "load_quantized",
    "lora_apply",
    "merge",
    "optimizer",
    "quantize",
    "register_layer",
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
