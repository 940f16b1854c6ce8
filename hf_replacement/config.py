"""`ReplacementConfig`: what to replace and how, serializable to `replacement_config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "replacement_config.json"
# Bumped when the meaning of a saved field changes. Version 1 (before chains): one list of blocks found
# by the top config's depths, and `replace_interval` counting every block; those files still load as
# they were saved (blocks.find_chains(legacy=True), selection.legacy_interval_indices).
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
READABLE_FORMAT_VERSIONS = (LEGACY_FORMAT_VERSION, FORMAT_VERSION)

GRANULARITIES = ("block", "tensor", "channel")
# coefficient_init="fit": least-squares coefficients rebuilding each replaced block's own weights (fitting.py).
FIT = "fit"
DEFAULT_COEFFICIENT_INIT = (0.5, 0.5)
_FLOAT32_MAX = 3.4028234663852886e38  # the coefficients are float32: a larger initial value is inf
FUSION_MODES = ("resample", "nearest", "error")
# What a replaced block computes (surrogates.py): all of it (the 2024 reading), or a lighter part.
SURROGATES = ("block", "mlp", "half")


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A config field whose help (and choices) `hf-replacement train` turns into a flag when `cli`."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def _is_block_path(value: Any) -> bool:
    def is_path(item: Any) -> bool:
        return isinstance(item, str) and bool(item)

    if is_path(value):
        return True
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            is_path(entry) or (isinstance(entry, list) and bool(entry) and all(is_path(p) for p in entry))
            for entry in value
        )
    )


def _added_after(version: Any) -> set[str]:
    """The fields a file of format `version` cannot hold: added in a later version (they take their defaults)."""
    return {"target_chains"} if version == LEGACY_FORMAT_VERSION else set()


class ReplacementConfigError(ValueError):
    """A `ReplacementConfig` field, or a saved `replacement_config.json`, is invalid."""


@dataclass
class ReplacementConfig:
    """Configuration of Replacement Learning (RepL).

    Args:
        replace_interval: replace about one block in k, in each chain (see `hf_replacement.blocks`):
            blocks k-1, 2k-1, ... of the chain, each moved to the nearest block that can be replaced
            when it cannot (the first and last of a chain, a ResNet stage's first block); a chain
            shorter than k but at least k/2 long gets its middle block. The paper uses 4. Ignored
            when `replaced_blocks` is set.
        replaced_blocks: explicit block indices (global, forward order) to replace instead of an
            interval. A saved checkpoint records the blocks it replaced here.
        coefficient_granularity: "block" (one (a, b) pair per replaced block, the paper), "tensor"
            (one pair per parameter tensor) or "channel" (one pair per output channel of each tensor).
        coefficient_init: initial (a, b), or "fit": for each replaced block, the least-squares
            coefficients (at the configured granularity) that best rebuild the block's own weights
            from its neighbours', computed when the block is replaced, from the weights it has then
            (at construction, or in `replace_blocks()` for a deferred replacement).
        fusion: how a neighbour tensor of another shape is used: "resample" (variance-preserving
            resampling to the replaced block's shape), "nearest" (only neighbours of matching shape)
            or "error".
        detach_neighbors: stop the gradient of the replaced block from flowing into its neighbours.
        recompute_replaced: recompute a replaced block's activations in backward instead of storing
            them (its weights are cheap to rebuild).
        surrogate: what a replaced block computes. "block" (default; the 2024 paper as we read it):
            the whole block with synthesized weights. Lighter surrogates (the 2026 paper's
            "lightweight computing layer"), synthesized the same way but only the tensors they use:
            "mlp" skips the token mixer (attention; ConvNeXt's depthwise conv) and runs the MLP
            sub-block; "half" also keeps only the first half of the MLP's hidden units (ResNet: the
            block at half its inner width). Which families have which: `hf_replacement.surrogates`.
        block_path: the blocks, for models the automatic discovery does not know: the dotted path of
            the `nn.ModuleList` holding them (e.g. "encoder.blocks"), or a list of chains, each such a
            path or a list of paths forming one chain (e.g. [["stages.0.layers", "stages.1.layers"],
            "decoder.layers"]). A saved checkpoint records the chains it was built with here.
        target_chains: replace blocks (by `replace_interval`) only in the chains whose name is one
            of these or starts with one of these and a dot, e.g. ["backbone"] for a task model's
            backbone only; None (default): every chain. `ReplacementModel.chains` lists the names.
    """

    replace_interval: int = _option(4, "replace every k-th block (blocks k-1, 2k-1, ...; the paper uses 4)")
    replaced_blocks: list[int] | None = _option(None, "explicit block indices to replace instead, e.g. 3,7")
    coefficient_granularity: str = _option(
        "block", "one (a, b) per block (the paper), per tensor or per output channel", choices=GRANULARITIES
    )
    coefficient_init: tuple[float, float] | str = _option(
        DEFAULT_COEFFICIENT_INIT,
        "initial a,b, or 'fit': least squares on each replaced block's own (pretrained) weights",
    )
    fusion: str = _option(
        "resample", "neighbours of another shape: resample, use only the matching one, or refuse", choices=FUSION_MODES
    )
    detach_neighbors: bool = _option(False, "no gradient from a replaced block into its neighbours")
    recompute_replaced: bool = _option(False, "recompute replaced blocks in backward (less memory, more time)")
    surrogate: str = _option(
        "block",
        "what a replaced block computes: the whole block, its MLP sub-block only (mlp) or that at half width (half)",
        choices=SURROGATES,
    )
    block_path: str | list[str | list[str]] | None = _option(
        None, "dotted path of the nn.ModuleList holding the blocks, or a list of chains", cli=False
    )
    target_chains: list[str] | None = _option(
        None, "replace blocks only in these chains (name prefixes, e.g. backbone); default: every chain"
    )
    format_version: int = field(default=FORMAT_VERSION, repr=False)

    def __post_init__(self) -> None:
        # JSON gives lists; anything not iterable is left for validate() to name.
        if isinstance(self.coefficient_init, (list, tuple)):
            self.coefficient_init = tuple(self.coefficient_init)
        if isinstance(self.replaced_blocks, (tuple, range)):
            self.replaced_blocks = list(self.replaced_blocks)
        if isinstance(self.target_chains, str):
            self.target_chains = [self.target_chains]
        elif isinstance(self.target_chains, tuple):
            self.target_chains = list(self.target_chains)
        self.validate()

    def validate(self) -> None:
        """Check each field's type and range; raise `ReplacementConfigError` naming the first bad one."""
        if (
            isinstance(self.replace_interval, bool)
            or not isinstance(self.replace_interval, int)
            or self.replace_interval < 2
        ):
            raise ReplacementConfigError(
                f"replace_interval={self.replace_interval!r} is invalid: it must be an integer >= 2 "
                "(1 would replace adjacent blocks); the paper uses 4."
            )
        if self.replaced_blocks is not None:
            if (
                not isinstance(self.replaced_blocks, list)
                or not self.replaced_blocks
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.replaced_blocks)
            ):
                raise ReplacementConfigError(
                    f"replaced_blocks={self.replaced_blocks!r} is invalid: give a non-empty list of block "
                    "indices (integers), or None to use replace_interval."
                )
            if len(set(self.replaced_blocks)) != len(self.replaced_blocks):
                raise ReplacementConfigError(f"replaced_blocks={self.replaced_blocks!r} lists a block twice.")
        if self.coefficient_granularity not in GRANULARITIES:
            raise ReplacementConfigError(
                f"coefficient_granularity={self.coefficient_granularity!r} is invalid: choose one of {GRANULARITIES}."
            )
        if self.fusion not in FUSION_MODES:
            raise ReplacementConfigError(f"fusion={self.fusion!r} is invalid: choose one of {FUSION_MODES}.")
        if self.surrogate not in SURROGATES:
            raise ReplacementConfigError(
                f"surrogate={self.surrogate!r} is invalid: choose one of {SURROGATES} (see hf_replacement.surrogates)."
            )
        init = self.coefficient_init
        if init != FIT and (
            not isinstance(init, tuple)
            or len(init) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT32_MAX for v in init)
        ):
            raise ReplacementConfigError(
                f"coefficient_init={init!r} is invalid: give two finite numbers (a, b) within float32 range, "
                f"e.g. (0.5, 0.5), or {FIT!r} (least squares on each replaced block's own weights)."
            )
        for name in ("detach_neighbors", "recompute_replaced"):
            if not isinstance(getattr(self, name), bool):
                raise ReplacementConfigError(f"{name}={getattr(self, name)!r} is invalid: it must be True or False.")
        if self.block_path is not None and not _is_block_path(self.block_path):
            raise ReplacementConfigError(
                f"block_path={self.block_path!r} is invalid: give the dotted path of an nn.ModuleList, "
                "e.g. 'encoder.layers', or a non-empty list of chains, each such a path or a non-empty list of them."
            )
        if self.target_chains is not None and (
            not isinstance(self.target_chains, list)
            or not self.target_chains
            or not all(isinstance(name, str) and name for name in self.target_chains)
        ):
            raise ReplacementConfigError(
                f"target_chains={self.target_chains!r} is invalid: give a non-empty list of chain names "
                "(e.g. ['backbone']), or None for every chain."
            )
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ReplacementConfigError(
                f"format_version={self.format_version!r} is not supported by this hf_replacement "
                f"(it reads versions {READABLE_FORMAT_VERSIONS}); upgrade hf_replacement to load this checkpoint."
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.coefficient_init, tuple):
            data["coefficient_init"] = list(self.coefficient_init)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplacementConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ReplacementConfigError(
                f"Unknown replacement config keys {unknown}; valid keys are {sorted(known)}. "
                "The file may come from a newer hf_replacement: upgrade it."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ReplacementConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{path} not found: a RepL checkpoint directory needs {CONFIG_NAME} "
                "(written by ReplacementModel.save_pretrained)."
            ) from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ReplacementConfigError(f"{path} is not valid JSON ({error}); the checkpoint is corrupt.") from error
        if not isinstance(data, dict):
            raise ReplacementConfigError(f"{path} must hold a JSON object, found {type(data).__name__}.")
        # `save_pretrained` writes every field: a missing one would silently take its default (another model).
        known = {f.name for f in dataclasses.fields(cls)}
        version = data.get("format_version", FORMAT_VERSION)
        missing = sorted(known - set(data) - _added_after(version))
        if missing and set(data) <= {f.name for f in dataclasses.fields(cls)}:
            raise ReplacementConfigError(
                f"{path} lacks the key(s) {missing}, which format_version {version} writes every time: "
                "the file was edited or truncated, and a default would load another model. Restore the file "
                "from the saved run (or add the keys with the values the model was trained with)."
            )
        return cls.from_dict(data)


__all__ = [
    "CONFIG_NAME",
    "DEFAULT_COEFFICIENT_INIT",
    "FIT",
    "FORMAT_VERSION",
    "LEGACY_FORMAT_VERSION",
    "FUSION_MODES",
    "GRANULARITIES",
    "SURROGATES",
    "ReplacementConfig",
    "ReplacementConfigError",
]
