"""hf_replacement: Replacement Learning (RepL) for Hugging Face Transformers vision models.

The public names load lazily (PEP 562), as Transformers' own do: `import hf_replacement` and the
command line's argument parsing import no torch, so `hf-replacement --help` answers at once; the
first use of a name imports the module that defines it.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .integrations.pipelines import allow_replacement_models_in_pipelines

__version__ = "0.1.0"

# Pipelines log a false "not supported" error for any class they do not know: the integration filters
# that one record. Installed here, with the other integrations, rather than by the core model (the
# module imports only `logging`, so the lazy package stays light).
allow_replacement_models_in_pipelines()
# Transformers' own loaders, given a RepL directory, say what it is and how to load it (loading.GUARD_MESSAGE).
# Registered now when Transformers is already imported, else on the first use of a public name: importing it
# here would import torch and Transformers, and `hf-replacement --help` must not.
if "transformers" in sys.modules:
    from .loading import register_guard_with_transformers

    register_guard_with_transformers()

# public name -> the submodule defining it
_EXPORTS = {
    "Block": ".blocks",
    "BlockDiscoveryError": ".blocks",
    "find_blocks": ".blocks",
    "Chain": ".blocks",
    "find_chains": ".blocks",
    "CONFIG_NAME": ".config",
    "ReplacementConfig": ".config",
    "ReplacementConfigError": ".config",
    "gather_state_dict": ".integrations.fsdp",
    "shard_model": ".integrations.fsdp",
    "sharding_units": ".integrations.fsdp",
    "merge_peft_and_replacement": ".integrations.peft",
    "prepare_peft_config": ".integrations.peft",
    "ReplacementCallback": ".integrations.trainer",
    "ReplacementTrainer": ".integrations.trainer",
    "ReplacementSeq2SeqTrainer": ".integrations.trainer",
    "ReplacementModel": ".model",
    "get_replacement_model": ".model",
    "FusionError": ".resampling",
}

__all__ = [  # a literal list, so linters and `from hf_replacement import *` read it without importing
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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .blocks import Block, BlockDiscoveryError, Chain, find_blocks, find_chains
    from .config import CONFIG_NAME, ReplacementConfig, ReplacementConfigError
    from .integrations.fsdp import gather_state_dict, shard_model, sharding_units
    from .integrations.peft import merge_peft_and_replacement, prepare_peft_config
    from .integrations.trainer import ReplacementCallback, ReplacementSeq2SeqTrainer, ReplacementTrainer
    from .model import ReplacementModel, get_replacement_model
    from .resampling import FusionError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .loading import register_guard_with_transformers

    register_guard_with_transformers()  # idempotent; Transformers is imported from here on
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
