"""`jlora train`: a reference LoRA training loop driven by YAML configs.

Examples:
  >>> from jlora import train
  >>> config = train.load("configs/default.yaml", ["train.steps=50", "lora.r=16"])  # doctest: +SKIP
  >>> result = train.run(config)  # doctest: +SKIP
  >>> result["after"]["recall@1"]  # doctest: +SKIP
  >>> print(train.plan(config, "v5e:2x4").text())  # compiled for a TPU slice, here (jlora[plan])  # doctest: +SKIP
"""

from jlora.train._compare import compare as compare
from jlora.train._load import apply_overrides as apply_overrides
from jlora.train._load import describe as describe
from jlora.train._load import load as load
from jlora.train._loop import Diverged as Diverged
from jlora.train._loop import Interrupted as Interrupted
from jlora.train._plan import Plan as Plan
from jlora.train._plan import plan as plan
from jlora.train._run import run as run
from jlora.train._schema import Config as Config
from jlora.train._schema import replace as replace

__all__ = ["Config", "Diverged", "Interrupted", "Plan", "apply_overrides", "compare", "describe", "load", "plan", "replace",
           "run"]
