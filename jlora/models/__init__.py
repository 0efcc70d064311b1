"""Reference models with Hugging Face module names, and local checkpoint loading.

Supported `model_type` values: `gpt2`, `llama`, `mistral`, `qwen2`, `mixtral`, `bert`, `t5`.
Every projection is an `nn.Dense` and every embedding an `nn.Embed` named as in
`transformers`, so PEFT `target_modules` lists (`["q_proj", "v_proj"]`,
`["c_attn"]`, `["query", "value"]`, `["q", "v"]`) apply unchanged; Mixtral's experts are
stacked `(E, in, out)` params that PEFT's `target_parameters`
(`["experts.gate_up_proj", "experts.down_proj"]`) name (docs/moe.md). Every model
reads and writes its Hugging Face tensor layout, names its modules for PEFT files
(`peft_name_map()`) and gives example inputs for `jlora.init`; the decoders also
hold the KV cache that `generate` uses.

Integer inputs are checked against their embedding tables outside `jax.jit` (token ids
below `vocab_size`; GPT-2 positions below `n_positions`; BERT token types and sequence
length): an out-of-range index raises a `ValueError` instead of giving NaN. Inside `jit`
values are not checked (no `checkify`); sequence lengths are static shapes, so a
sequence longer than a learned position table is refused inside `jit` too.

On a device mesh, `from_config(..., mesh=mesh)` and `from_pretrained(..., mesh=mesh)` create
the params straight into their shards: `logical_axes` names each parameter axis (`vocab`,
`embed`, `heads`, `kv`, `mlp`, `layers`, ...) and `mesh_shardings` maps the names to mesh axes
with `DEFAULT_RULES` (FSDP over `fsdp`, tensor parallelism over `tensor`); trace a
step inside `on_mesh(mesh)` so that the models keep their activations split by batch.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import models
  >>> model, params = models.from_config(
  ...     {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 11,
  ...      "n_positions": 16}, key=jax.random.key(0))
  >>> model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32)).shape
  (1, 3, 11)
"""

from jlora.models._decoding import generate as generate
from jlora.models._layers import KVCache as KVCache
from jlora.models._load import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from jlora.models._load import from_config as from_config
from jlora.models._load import from_hf_state_dict as from_hf_state_dict
from jlora.models._load import from_pretrained as from_pretrained
from jlora.models._load import minilm_path as minilm_path
from jlora.models._load import param_shapes as param_shapes
from jlora.models._partitioning import DEFAULT_RULES as DEFAULT_RULES
from jlora.models._partitioning import logical_axes as logical_axes
from jlora.models._partitioning import mesh_shardings as mesh_shardings
from jlora.models._partitioning import on_mesh as on_mesh
from jlora.models._save import save_pretrained as save_pretrained
from jlora.models._save import to_hf_state_dict as to_hf_state_dict
from jlora.models.tokenizer import Tokenizer as Tokenizer

__all__ = [
  "DEFAULT_RULES",
  "SUPPORTED_MODEL_TYPES",
  "KVCache",
  "Tokenizer",
  "from_config",
  "from_hf_state_dict",
  "from_pretrained",
  "generate",
  "logical_axes",
  "mesh_shardings",
  "on_mesh",
  "minilm_path",
  "param_shapes",
  "save_pretrained",
  "to_hf_state_dict",
]
