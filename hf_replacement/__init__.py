"""hf_replacement: Replacement Learning (RepL) for Hugging Face Transformers vision models."""

from .blocks import Block, BlockDiscoveryError, Chain, find_blocks, find_chains
from .config import CONFIG_NAME, ReplacementConfig, ReplacementConfigError
from .integrations.fsdp import gather_state_dict, shard_model, sharding_units
from .integrations.peft import merge_peft_and_replacement, prepare_peft_config
from .integrations.pipelines import allow_replacement_models_in_pipelines
from .integrations.trainer import ReplacementCallback, ReplacementSeq2SeqTrainer, ReplacementTrainer
from .loading import register_guard_with_transformers
from .model import ReplacementModel, get_replacement_model
from .resampling import FusionError

__version__ = "0.1.0"

# Pipelines log a false "not supported" error for any class they do not know: the integration filters
# that one record. Installed here, with the other integrations, rather than by the core model.
allow_replacement_models_in_pipelines()
# Transformers' own loaders, given a RepL directory, say what it is and how to load it (loading.GUARD_MESSAGE).
register_guard_with_transformers()

__all__ = [
    "Block",
    "BlockDiscoveryError",
    "CONFIG_NAME",
    "Chain",
    "FusionError",
    "ReplacementCallback",
    "ReplacementConfig",
    "ReplacementConfigError",
    "ReplacementModel",
    "ReplacementSeq2SeqTrainer",
    "ReplacementTrainer",
    "find_blocks",
    "find_chains",
    "gather_state_dict",
    "get_replacement_model",
    "merge_peft_and_replacement",
    "prepare_peft_config",
    "shard_model",
    "sharding_units",
    "__version__",
]
