"""Sharing on the Hugging Face Hub: the model card, `push_to_hub` and the download behind `from_pretrained`.

Everything goes through the `huggingface_hub` client (no hand-written HTTP). The endpoint is read
from `HF_ENDPOINT` at call time, not only at import of `huggingface_hub` (which caches it), so a
mirror or a test server can be chosen after import.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard_data import EvalResult
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .utils import count_parameters

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "replacement_model_card.md"
# What a RepL or merged checkpoint consists of; anything else in a repo (images, logs) is not fetched.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.md"]
# Files a previous push may have left that would contradict the new one (a merged push over a compact
# one must drop replacement_config.json, or ReplacementModel.from_pretrained would misread the repo).
_STALE_FILES = re.compile(
    r"^(replacement_config\.json|base_config\.json|results\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?)$"
)
_KNOWN_METRICS = ("accuracy", "top5_accuracy", "f1", "precision", "recall")
# The launcher's data set names that have a Hub copy.
_KNOWN_HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}
# Nested or bulky entries of results.json that belong in the JSON file, not in the card's table.
_RESULT_KEYS_NOT_SHOWN = {"options", "replacement_config", "coefficients", "replaced_blocks"}


class HubError(OSError):
    """Talking to the Hub failed. `status_code` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class HubPushError(HubError):
    """`push_to_hub` failed; nothing local was changed."""


class HubDownloadError(HubError):
    """A checkpoint could not be downloaded from the Hub."""


@dataclass(frozen=True)
class CardFacts:
    """What a model card says about a model: `ReplacementModel.card_facts()` for a RepL model,
    `CardFacts.of_plain_model` for any other."""

    architecture: str
    config: Any
    trainable_params: int
    total_params: int
    unreplaced_params: int
    granularity: str = "block"
    replaced_blocks: tuple[dict[str, Any], ...] = ()  # {"index", "name", "a", "b"}
    num_blocks: int = 0
    is_replacement: bool = False

    @classmethod
    def of_plain_model(cls, model: nn.Module) -> CardFacts:
        trainable, total = count_parameters(model)
        return cls(type(model).__name__, getattr(model, "config", None), trainable, total, total)


def card_facts(model: nn.Module) -> CardFacts:
    """A RepL model describes itself (`card_facts()`); any other model is described as plain."""
    describe = getattr(model, "card_facts", None)
    return describe() if callable(describe) else CardFacts.of_plain_model(model)


def hub_endpoint() -> str | None:
    """`HF_ENDPOINT` as set now (None: huggingface_hub's default)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None


def looks_like_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id ("user/name" or "name"), as opposed to a filesystem path."""
    if (
        not name
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
    ):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# --------------------------------------------------------------------------------------------- card


def render_model_card(
    model: nn.Module,
    results: dict[str, Any] | str | os.PathLike | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    merged: bool = False,
    repo_id: str | None = None,
) -> ModelCard:
    """Render the README.md model card of `model` (a `ReplacementModel`, or a plain model).

    `results` is the training results dict or a path to `results.json`; `merged` says whether the
    repository will hold the merged Transformers model rather than the compact RepL checkpoint.
    """
    facts = card_facts(model)
    results = _load_results(results)
    datasets = [d for d in (datasets or []) if d]
    base_model = base_model or _base_model_from_config(facts.config)
    repo_id = repo_id or "<user>/<repo>"
    blocks = [block | {"a": _fmt(block["a"]), "b": _fmt(block["b"])} for block in facts.replaced_blocks]
    trainable, total, full = facts.trainable_params, facts.total_params, facts.unreplaced_params
    saved = 100 * (1 - total / full) if full else None

    hub_datasets = _hub_dataset_ids(datasets)
    metrics = [key for key in _KNOWN_METRICS if results and key in results] or None
    eval_results = None
    if results and hub_datasets and isinstance(results.get("accuracy"), (int, float)):
        # model-index entry: lets the Hub show the score on the model page.
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=hub_datasets[0],
                dataset_name=hub_datasets[0],
                metric_type="accuracy",
                metric_value=float(results["accuracy"]),
            )
        ]
    card_data = ModelCardData(
        library_name="transformers" if merged or not facts.is_replacement else "hf-replacement",
        tags=["hf-replacement", "replacement-learning", "image-classification", "vision"]
        + (["merged"] if merged else []),
        base_model=base_model,
        datasets=hub_datasets or None,
        metrics=metrics,
        pipeline_tag="image-classification",
        # Only as the model-index entry's name: on its own it would be a non-standard top-level key.
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
    )
    rows = [
        (key, _fmt(value))
        for key, value in (results or {}).items()
        if key not in _RESULT_KEYS_NOT_SHOWN and _is_scalar(value)
    ]
    packages = {"hf_replacement": "hf-replacement"} | {
        name: name for name in ("transformers", "torch", "huggingface_hub", "safetensors")
    }
    versions = [(name, _version(distribution)) for name, distribution in packages.items()]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        merged=merged,
        architecture=facts.architecture,
        replaced_blocks=blocks,
        num_blocks=facts.num_blocks,
        granularity=facts.granularity,
        trainable_params=f"{trainable:,d}",
        total_params=f"{total:,d}",
        full_params=f"{full:,d}",
        saved_percent=None if saved is None or saved <= 0 else f"{saved:.2f}",
        results=rows,
        datasets=datasets,
        versions=versions,
    )


def _hub_dataset_ids(names: list[str]) -> list[str]:
    """The Hub dataset ids among `names`: the card's `datasets:` links to Hub pages, so a local path or
    an embedded set with no Hub copy (scikit-learn's digits) stays out of the metadata (the body names it)."""
    ids = [_KNOWN_HUB_DATASETS.get(name, name) for name in names]
    return [name for name in ids if "/" in name and looks_like_repo_id(name) and not os.path.exists(name)]


def _load_results(results: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    if results is None or isinstance(results, dict):
        return results
    path = Path(results)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        return None  # "when present": a run without results still gets a card
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _base_model_from_config(config: Any) -> str | None:
    # A model loaded from the Hub remembers its repo id; a local path or a random init is no base model.
    name = getattr(config, "_name_or_path", None) or ""
    return name if "/" in name and looks_like_repo_id(name) and not os.path.exists(name) else None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.float().mean().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,d}"
    return f"{value:.4g}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------- push


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    merged: bool = False,
    revision: str | None = None,
    results: dict[str, Any] | str | os.PathLike | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    create_pr: bool = False,
    image_processor: Any = None,
) -> str:
    """Push `model` and its model card to the Hub repo `repo_id` (created if needed); return the commit URL
    (with `create_pr=True`, the URL of the pull request the commit opens instead).

    The compact RepL checkpoint is pushed (`replacement_config.json`, `base_config.json`, a guard `config.json`,
    `model.safetensors`), or with `merged=True` the plain Transformers model that
    `AutoModelForImageClassification.from_pretrained` loads; `model` itself is left unchanged.
    `results` (a dict or the path of `results.json`) fills the card's results section and is
    uploaded as `results.json`; `tags` and `license` join the card's metadata. `image_processor` (one with
    `save_pretrained`) is uploaded as `preprocessor_config.json`, which `pipeline("image-classification",
    model=repo_id)` needs. Raises `HubPushError` when the Hub cannot be reached or refuses.
    """
    validate_repo_id(repo_id)  # a ValueError for a malformed id, before any work
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"push_to_hub needs a ReplacementModel or a Transformers model, got {type(model).__name__}.")
    if image_processor is not None and not hasattr(image_processor, "save_pretrained"):
        raise TypeError(
            f"image_processor must be a Transformers image processor (with save_pretrained), got "
            f"{type(image_processor).__name__}."
        )
    results = _load_results(results)
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    kind = "merged model" if merged or not card_facts(model).is_replacement else "RepL checkpoint"
    with tempfile.TemporaryDirectory(prefix="hf_replacement_push_") as folder:
        # Everything is staged in a temporary folder: the caller's own saved checkpoint is never touched.
        card = render_model_card(model, results, base_model, datasets, merged=merged, repo_id=repo_id)
        card.data.tags = list(dict.fromkeys(card.data.tags + list(tags or [])))
        card.data.license = license
        _save_for_push(model, folder, merged)
        if image_processor is not None:
            image_processor.save_pretrained(folder)
        card.save(os.path.join(folder, "README.md"))
        if results is not None:
            with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=2, default=str)
        failure: HubPushError | None = None
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            repo_id = repo_url.repo_id  # "name" alone resolves to the token owner's namespace
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.create_commit(
                repo_id,
                _operations(api, repo_id, folder, revision),
                commit_message=commit_message or f"Upload {kind} with hf_replacement",
                revision=revision,
                create_pr=create_pr,
            )
        except _network_errors() as error:
            failure = _push_error(error, repo_id, endpoint or "https://huggingface.co", token)
        if failure is not None:
            # Raised outside the except block: the original error (whose message may echo the token)
            # must not ride along as __context__ into tracebacks and error reports.
            raise failure
    url = commit.pr_url if create_pr else commit.commit_url
    logger.info("Pushed the %s to %s", kind, url)
    return url


def _save_for_push(model: nn.Module, folder: str, merged: bool) -> None:
    # A RepL model writes its merged form without changing itself (`save_merged`); a plain model is
    # already merged.
    save_merged = getattr(model, "save_merged", None)
    if merged and callable(save_merged):
        save_merged(folder)
    else:
        model.save_pretrained(folder)


def _operations(api: HfApi, repo_id: str, folder: str, revision: str | None) -> list:
    # create_commit, not upload_folder: with hf_xet installed upload_folder goes through a pipeline
    # that retries a failed commit with backoff for ~30 s, and it cannot drop stale files by name.
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    operations: list = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files
    ]
    remote = api.list_repo_files(repo_id, revision=revision)
    operations += [
        CommitOperationDelete(path_in_repo=name) for name in remote if _STALE_FILES.match(name) and name not in files
    ]
    return operations


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub raises HfHubHTTPError for HTTP answers; transport errors come from its HTTP
    # library (httpx2 in 1.x/2.x, requests before), whose errors are not all OSErrors.
    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for attribute in ("HTTPError", "RequestException", "TransportError"):
            if isinstance(getattr(module, attribute, None), type):
                errors.append(getattr(module, attribute))
    return tuple(errors)


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _scrub(text: str, token: str | bool | None) -> str:
    """Remove every form of the token from `text` (error messages may echo request headers)."""
    secrets = {token} if isinstance(token, str) else set()
    try:
        from huggingface_hub import get_token

        secrets.add(get_token() or "")
    except Exception:  # no stored token, or an old huggingface_hub: nothing more to hide
        pass
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"(?i)(bearer\s+)[^\s'\"]+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)


def _push_error(error: BaseException, repo_id: str, endpoint: str, token: str | bool | None) -> HubPushError:
    status = _status(error)
    if status is None and not isinstance(error, HfHubHTTPError) and not isinstance(error, ValueError):
        advice = (
            f"could not connect to {endpoint}: check the network connection (and HF_ENDPOINT if set), then push again."
        )
    elif status == 401 or isinstance(error, RepositoryNotFoundError) and status in (401, 404):
        advice = (
            f"the Hub refused the credentials (HTTP {status}): log in with `hf auth login` or pass "
            "token=<a write token> that can write to this namespace."
        )
    elif status == 403:
        advice = "the token may not write to this namespace (HTTP 403): use a token with write access to it."
    elif status is not None and status >= 500:
        advice = f"the Hub had a server error (HTTP {status}): try again later."
    elif status is not None:
        advice = f"the Hub refused the request (HTTP {status})."
    else:
        advice = "the Hub rejected the upload."
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    if getattr(error, "server_message", None):  # what the Hub said, e.g. "Invalid username or password"
        detail += f" ({error.server_message.strip()})"
    detail = _scrub(detail, token)
    message = (
        f"Pushing to Hub repo {repo_id!r} failed: {advice} Nothing local was changed (the model in memory "
        f"and any checkpoint you saved are intact). Cause: {type(error).__name__}: {detail[:300]}"
    )
    logger.error("%s", message)
    return HubPushError(message, status_code=status)


# ----------------------------------------------------------------------------------------- download


def download_checkpoint(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> str:
    """Download a checkpoint's JSON, safetensors and card files from the Hub (or with `local_files_only`
    take them from the cache); return the local folder.

    Only `*.json`, `*.safetensors` and `*.md` are fetched: nothing that could run code on load
    (pickles, scripts). Raises `HubDownloadError` saying whether the repo, the revision or the
    connection was the problem.
    """
    endpoint = hub_endpoint()
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    failure: HubDownloadError | None = None
    folder = ""
    try:
        where_from = {"endpoint": endpoint, "cache_dir": cache_dir, "local_files_only": local_files_only}
        folder = snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=DOWNLOAD_PATTERNS, **where_from
        )
    except RevisionNotFoundError:
        failure = HubDownloadError(
            f"Hub repo {repo_id!r} has no revision {revision!r}: check the branch, tag or commit.", 404
        )
    except RepositoryNotFoundError as error:
        failure = HubDownloadError(
            f"Hub repo {repo_id!r} was not found at {endpoint or 'https://huggingface.co'} (HTTP {_status(error)}): "
            "check the name, or pass token=... / log in if it is private.",
            _status(error),
        )
    except LocalEntryNotFoundError as error:  # snapshot_download's answer to no connection (or a 5xx)
        failure = HubDownloadError(
            f"Could not download {where} from {endpoint or 'https://huggingface.co'} and it is not in the local cache: "
            "check the network connection (and HF_ENDPOINT if set). "
            f"Cause: {_scrub(str(error).splitlines()[0], token)[:300]}",
            _status(error),
        )
    except _network_errors() as error:
        failure = HubDownloadError(
            f"Downloading {where} failed: {type(error).__name__}: {_scrub(str(error).strip()[:300], token)}",
            _status(error),
        )
    if failure is not None:
        raise failure  # outside the except block, for the same reason as in push_to_hub
    logger.info("Downloaded %s to %s", where, folder)
    return folder


__all__ = [
    "DOWNLOAD_PATTERNS",
    "HubDownloadError",
    "HubError",
    "HubPushError",
    "TEMPLATE_PATH",
    "download_checkpoint",
    "hub_endpoint",
    "looks_like_repo_id",
    "push_to_hub",
    "render_model_card",
]
