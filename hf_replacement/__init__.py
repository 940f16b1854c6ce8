"""hf_replacement: Replacement Learning (RepL) for Hugging Face Transformers vision models."""

from .blocks import Block, BlockDiscoveryError, find_blocks
from .config import CONFIG_NAME, ReplacementConfig, ReplacementConfigError
from .fusion import FusionError
from .model import ReplacementModel, get_replacement_model
from .peft_support import merge_peft_and_replacement, prepare_peft_config
from .sharding import gather_state_dict, shard_model, sharding_units
from .trainer import ReplacementCallback, ReplacementTrainer

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockDiscoveryError",
    "CONFIG_NAME",
    "FusionError",
    "ReplacementCallback",
    "ReplacementConfig",
    "ReplacementConfigError",
    "ReplacementModel",
    "ReplacementTrainer",
    "find_blocks",
    "gather_state_dict",
    "get_replacement_model",
    "merge_peft_and_replacement",
    "prepare_peft_config",
    "shard_model",
    "sharding_units",
    "__version__",
]
