"""Hub sharing: the real `huggingface_hub` client against a loopback Hub (tests/hub_server.py).

Push (compact and merged), download with `ReplacementModel.from_pretrained` and with plain
Transformers, the model card, and every failure: server down, 401, 500, missing repo/revision.
The same push from the Trainer (`ReplacementTrainer`) and from the launcher (`--push-to-hub`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import transformers.utils.hub
from hub_server import FakeHub
from huggingface_hub import ModelCard, constants
from PIL import Image
from test_trainer import dataset, repl_vit, training_args
from test_trainer import logits as logits_of
from tolerances import assert_fp32_close, fp32_atol, reduction_length
from transformers import TrainingArguments

from hf_replacement import ReplacementConfig, ReplacementModel, ReplacementTrainer, get_replacement_model
from hf_replacement.commands.cli import main
from hf_replacement.commands.processing import build_image_processor
from hf_replacement.hub import TEMPLATE_PATH, HubDownloadError, HubPushError, push_to_hub, render_model_card

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_TestWriteToken1234567890abcd"
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_repl_model() -> ReplacementModel:
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = get_replacement_model(transformers.ViTForImageClassification(config), ReplacementConfig(replace_interval=2))
    with torch.no_grad():  # coefficients other than the initial (0.5, 0.5), so a mix-up would show
        for parameter in model.replacement_coefficients.parameters():
            parameter.copy_(torch.tensor([[0.3], [0.8]]).expand_as(parameter))
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS).logits


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A private Hugging Face home and cache, no stored token; yields a function starting a FakeHub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub read these at import: point the module constants at tmp_path as well.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    hubs = []

    def start(**options) -> FakeHub:
        hub = FakeHub(**options).__enter__()
        hubs.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        return hub

    yield start
    for hub in hubs:
        hub.close()


@pytest.fixture
def trainer_hub(hub_env, monkeypatch):
    """A FakeHub (with TOKEN) that the Trainer's own uploads reach too.

    Transformers pushes through one shared HfApi, whose endpoint is huggingface_hub's import-time
    constant: point the constants at the server (as HF_ENDPOINT set before the import would) and
    let the HfApi be built anew.
    """
    hub = hub_env(token=TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    return hub


def test_template_copy_in_model_cards_is_identical():
    # The packaged template is canonical (it ships in the wheel); model_cards/ holds a copy for readers.
    assert (REPO_ROOT / "model_cards" / "replacement_model_card.md").read_bytes() == TEMPLATE_PATH.read_bytes()


def test_push_compact_then_from_pretrained(hub_env, tmp_path):
    hub = hub_env(token=TOKEN)
    model = tiny_repl_model()
    url = model.push_to_hub("user/repl-vit", token=TOKEN, results={"accuracy": 0.75}, datasets=["digits"])
    assert url.startswith(f"{hub.url}/user/repl-vit/commit/")
    files = hub.files("user/repl-vit")
    assert {"README.md", "config.json", "model.safetensors", "replacement_config.json", "results.json"} <= set(files)

    loaded = ReplacementModel.from_pretrained("user/repl-vit", token=TOKEN)
    assert loaded.replaced_blocks == model.replaced_blocks == {1: "vit.layers.1"}
    for name, values in model.get_coefficients().items():
        assert torch.equal(loaded.get_coefficients()[name]["a"], values["a"])
        assert torch.equal(loaded.get_coefficients()[name]["b"], values["b"])
    assert torch.equal(logits(loaded), logits(model))

    # A later push to the same repo, then loading the first commit by revision.
    first_commit = url.rsplit("/", 1)[1]
    with torch.no_grad():
        for parameter in model.replacement_coefficients.parameters():
            parameter.fill_(0.5)
    model.push_to_hub("user/repl-vit", token=TOKEN)
    assert not torch.equal(logits(ReplacementModel.from_pretrained("user/repl-vit", token=TOKEN)), logits(loaded))
    assert torch.equal(
        logits(ReplacementModel.from_pretrained("user/repl-vit", revision=first_commit, token=TOKEN)), logits(loaded)
    )

    # A push to a branch leaves main alone.
    model.push_to_hub("user/repl-vit", token=TOKEN, revision="experiment", merged=True)
    assert "replacement_config.json" not in hub.files("user/repl-vit", "experiment")
    assert "replacement_config.json" in hub.files("user/repl-vit", "main")


def test_push_plain_model_of_a_baseline_run(hub_env):
    # train.py pushes the unwrapped model, which is a plain Transformers model for --baseline runs.
    hub = hub_env()
    plain = tiny_repl_model().merge_and_unload()
    push_to_hub(plain, "user/baseline", results={"accuracy": 0.5, "method": "baseline"}, datasets=["digits"])
    card = ModelCard(hub.files("user/baseline")["README.md"].decode())
    assert card.data.library_name == "transformers" and "No block is replaced" in card.text
    assert {"config.json", "model.safetensors"} <= set(hub.files("user/baseline"))


def test_push_merged_loads_with_plain_transformers(hub_env, monkeypatch):
    hub = hub_env()
    model = tiny_repl_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.push_to_hub("user/repl-vit")  # compact first: the merged push must drop its RepL files
    processor = build_image_processor(16, 3)
    model.push_to_hub("user/repl-vit", merged=True, image_processor=processor)
    assert "replacement_config.json" not in hub.files("user/repl-vit")
    assert hub.files("user/repl-vit")["preprocessor_config.json"].decode() == processor.to_json_string()

    # The caller's RepL model is unchanged: still replaced, same weights and coefficients.
    assert model.replaced_blocks == {1: "vit.layers.1"}
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())

    # Transformers downloads through huggingface_hub's import-time endpoint constants.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    plain = transformers.AutoModelForImageClassification.from_pretrained("user/repl-vit").eval()
    assert type(plain).__name__ == "ViTForImageClassification"
    assert_fp32_close(logits(plain), logits(model), reduction_length(plain))  # merged weights: fp32 rounding

    with pytest.raises(FileNotFoundError, match="not a RepL checkpoint.*AutoModelForImageClassification"):
        ReplacementModel.from_pretrained("user/repl-vit")

    # The pushed processor serves the pushed model by repo id: the RepL model's answer for the same image.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (answer,) = transformers.pipeline("image-classification", model="user/repl-vit", device="cpu", top_k=1)(image)
    with torch.no_grad():
        probabilities = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    assert answer["label"] == model.config.id2label[int(probabilities.argmax())]
    assert answer["score"] == pytest.approx(float(probabilities.max()), abs=fp32_atol(1.0, reduction_length(model)))


def test_model_card_metadata_and_body(hub_env, tmp_path):
    model = tiny_repl_model()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"accuracy": 0.8125, "updates": 40, "options": {"lr": 0.001}}')
    card = render_model_card(
        model, tmp_path / "run", base_model="google/vit-base-patch16-224", datasets=["digits", "user/my-images"]
    )
    parsed = ModelCard(str(card))  # what the Hub and ModelCard.load read back from README.md
    data = parsed.data
    assert data.library_name == "hf-replacement"
    assert "replacement-learning" in data.tags
    assert data.pipeline_tag == "image-classification"
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.datasets == ["user/my-images"]  # Hub ids only: digits has no Hub page
    assert "Data sets: digits, user/my-images." in parsed.text
    assert data.metrics == ["accuracy"]
    assert data.eval_results[0].metric_value == 0.8125 and data.eval_results[0].dataset_type == "user/my-images"
    assert "model_name" not in data.to_dict()
    trainable, total = model.get_nb_trainable_parameters()
    for text in (
        "`vit.layers.1`",
        "| 0.3 | 0.8 |",
        f"{trainable:,d}",
        f"{model._num_unreplaced_parameters:,d}",
        "| accuracy | 0.8125 |",
        "ReplacementModel.from_pretrained",
        f"transformers {transformers.__version__}",
    ):
        assert text in parsed.text, text
    assert "lr" not in parsed.text  # nested run options stay in results.json

    merged = ModelCard(str(render_model_card(model, merged=True)))
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert merged.data.base_model is None and merged.data.metrics is None  # no results, no metrics
    assert "model_name" not in merged.data.to_dict()
    assert "AutoModelForImageClassification.from_pretrained" in merged.text
    assert "No training results were recorded" in merged.text

    # The README pushed to the Hub passes its YAML validation and loads with ModelCard.load.
    hub = hub_env()
    push_to_hub(model, "user/card", base_model="google/vit-base-patch16-224")
    (tmp_path / "README.md").write_bytes(hub.files("user/card")["README.md"])
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "google/vit-base-patch16-224"


def test_push_to_a_server_that_is_down(hub_env, tmp_path):
    hub = hub_env()
    hub.close()  # the port is closed now: connection refused
    with pytest.raises(HubPushError, match="could not connect to http://127.0.0.1:.*Nothing local was changed") as info:
        tiny_repl_model().push_to_hub("user/repo")
    assert info.value.status_code is None


def test_push_with_a_rejected_token_never_shows_it(hub_env, caplog):
    hub_env(token=TOKEN)
    secret = "hf_WrongSecretToken0987654321zyx"
    caplog.set_level(logging.DEBUG)
    # httpcore2's DEBUG wire trace prints raw response headers, i.e. whatever a server echoes back;
    # that trace is the transport's, not ours or huggingface_hub's (the real Hub does not echo tokens).
    caplog.set_level(logging.INFO, logger="httpcore2")
    with pytest.raises(HubPushError, match="HTTP 401.*hf auth login") as info:
        tiny_repl_model().push_to_hub("user/repo", token=secret)
    assert info.value.status_code == 401
    # The server echoed the Authorization header into its error: it must be scrubbed everywhere.
    assert secret not in str(info.value)
    assert "Invalid username or password" in str(info.value)  # the server's reason, scrubbed
    # No chained original error (its message holds the token) for a traceback to print.
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert secret not in caplog.text
    assert "HTTP 401" in caplog.text


def test_failed_commit_leaves_the_local_checkpoint_intact(hub_env, tmp_path):
    hub = hub_env(fail_commits=True)
    model = tiny_repl_model()
    model.save_pretrained(tmp_path / "checkpoint")
    saved = {path.name: path.read_bytes() for path in (tmp_path / "checkpoint").iterdir()}
    with pytest.raises(HubPushError, match="HTTP 500.*try again later") as info:
        model.push_to_hub("user/repo", merged=True)
    assert info.value.status_code == 500
    assert {path.name: path.read_bytes() for path in (tmp_path / "checkpoint").iterdir()} == saved
    assert set(hub.files("user/repo")) == {".gitattributes"}  # nothing half-committed
    assert model.replaced_blocks == {1: "vit.layers.1"}  # and the model was not merged in place


def test_download_errors(hub_env, tmp_path):
    hub = hub_env()
    with pytest.raises(HubDownloadError, match="'user/missing' was not found"):
        ReplacementModel.from_pretrained("user/missing")
    tiny_repl_model().push_to_hub("user/repo")
    with pytest.raises(HubDownloadError, match="has no revision 'no-such-branch'"):
        ReplacementModel.from_pretrained("user/repo", revision="no-such-branch")
    # A local path that does not exist is still a local error, never a Hub lookup.
    with pytest.raises(FileNotFoundError, match="is not a directory holding a RepL checkpoint"):
        ReplacementModel.from_pretrained(tmp_path / "nothing")
    requests = len(hub.requests)
    hub.close()
    with pytest.raises(HubDownloadError, match="check the network connection"):
        ReplacementModel.from_pretrained("user/other")
    assert len(hub.requests) == requests


# ---- the Trainer and the launcher ----------------------------------------------------------------


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def test_trainer_pushes_repl_checkpoints_with_our_card(trainer_hub, tmp_path, caplog):
    args = training_args(
        tmp_path,
        push_to_hub=True,
        hub_model_id="user/trainer-repl",
        hub_token=TOKEN,
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer = ReplacementTrainer(
        repl_vit(), args, train_dataset=dataset(), eval_dataset=dataset(8), compute_metrics=accuracy, merge_at_end=True
    )
    assert "hub_token is pickled into training_args.bin" in caplog.text  # Transformers uploads it: a warning
    trainer.train()
    # The Trainer's own checkpoint pushes (one or two: it skips one while the previous is uploading)
    # are complete RepL checkpoints with our card.
    repo = trainer_hub.repos["user/trainer-repl"]
    pushed = [files for files in repo.commits.values() if "model.safetensors" in files]
    assert pushed and all("replacement_config.json" in files for files in pushed)
    assert all(ModelCard(files["README.md"].decode()).data.library_name == "hf-replacement" for files in pushed)

    trainer.push_to_hub(dataset_tags="fashion-mnist", tags="my-run", license="mit")
    files = trainer_hub.files("user/trainer-repl")
    assert {"README.md", "config.json", "model.safetensors", "replacement_config.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    last_eval = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry][-1]
    assert card.data.library_name == "hf-replacement" and "generated_from_trainer" not in card.data.tags
    assert {"replacement-learning", "my-run"} <= set(card.data.tags) and card.data.license == "mit"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert card.data.eval_results[0].metric_value == last_eval["eval_accuracy"]
    assert "| updates | 4 |" in card.text and "`vit.layers.1`" in card.text
    assert 'ReplacementModel.from_pretrained("user/trainer-repl")' in card.text
    assert {"merged/config.json", "merged/model.safetensors"} <= set(files)  # merge_at_end's output, beside it

    loaded = ReplacementModel.from_pretrained("user/trainer-repl", token=TOKEN)
    images = dataset(8)[:]["pixel_values"]
    assert torch.equal(logits_of(loaded, images), logits_of(trainer.model, images))


def test_trainer_card_reports_the_best_model_it_holds(tmp_path):
    scores = iter([1.0, 0.0])  # the evaluation at step 2 is the best one
    args = training_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    trainer = ReplacementTrainer(
        repl_vit(),
        args,
        train_dataset=dataset(),
        eval_dataset=dataset(8),
        compute_metrics=lambda _: {"score": next(scores)},
    )
    trainer.train()
    trainer.create_model_card()  # what trainer.push_to_hub() uploads as README.md
    card = ModelCard.load(tmp_path / "README.md")
    assert "| score | 1 |" in card.text and "| updates | 2 |" in card.text


def test_trainer_pushes_from_the_main_process_only(trainer_hub, tmp_path, monkeypatch):
    args = training_args(tmp_path, push_to_hub=True, hub_model_id="user/repo", hub_token=TOKEN)
    trainer = ReplacementTrainer(repl_vit(), args, train_dataset=dataset())
    # As on the process of rank 1 of a distributed run.
    monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: 1))
    trainer.state.is_world_process_zero = False
    requests = len(trainer_hub.requests)
    trainer.push_to_hub()
    assert len(trainer_hub.requests) == requests
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_launcher_pushes_the_trained_checkpoint(hub_env, tmp_path, capsys, caplog):
    hub = hub_env(token=TOKEN)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "vit-mini",
                "--dataset",
                "digits",
                "--max-train-samples",
                "64",
                "--max-eval-samples",
                "32",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--output-dir",
                str(out),
                "--push-to-hub",
                "--hub-model-id",
                "user/launcher-repl",
                "--hub-token",
                TOKEN,
            ]
        )
        == 0
    )
    files = hub.files("user/launcher-repl")
    assert {"README.md", "config.json", "model.safetensors", "replacement_config.json", "results.json"} <= set(files)
    assert files["preprocessor_config.json"] == (out / "preprocessor_config.json").read_bytes()
    results = json.loads((out / "results.json").read_text())
    card = ModelCard(files["README.md"].decode())
    assert card.data.datasets is None and card.data.eval_results is None  # digits: no Hub dataset to link
    assert card.data.metrics == ["accuracy"] and f"| accuracy | {results['accuracy']:.4g} |" in card.text

    local = ReplacementModel.from_pretrained(out)
    pushed = ReplacementModel.from_pretrained("user/launcher-repl", token=TOKEN)
    size, channels = local.config.image_size, local.config.num_channels
    images = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(0))
    assert pushed.replaced_blocks == local.replaced_blocks != {}
    assert torch.equal(logits_of(pushed, images), logits_of(local, images))

    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err and TOKEN not in caplog.text
    assert not [name for name, content in files.items() if TOKEN.encode() in content]
    assert not [path for path in out.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]


@pytest.mark.slow
def test_launcher_under_fsdp_pushes_the_saved_checkpoint(hub_env, tmp_path, process_group):
    """A sharded model cannot be pushed as it is: --fsdp pushes what it saved, loaded whole (one rank, in process)."""
    hub = hub_env(token=TOKEN)
    out = tmp_path / "run"
    argv = ["train", "--model", "vit-mini", "--max-train-samples", "32", "--max-eval-samples", "32", "--epochs", "1",
            "--batch-size", "32", "--fsdp", "--output-dir", str(out), "--push-to-hub", "--hub-model-id",
            "user/fsdp-repl", "--hub-token", TOKEN]  # fmt: skip
    assert main(argv) == 0
    files = hub.files("user/fsdp-repl")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"README.md", "replacement_config.json", "results.json"} <= set(files)


def test_push_keywords_tags_license_and_pull_request(hub_env):
    hub = hub_env()
    model = tiny_repl_model()
    model.push_to_hub("user/keywords", tags=["my-run"], license="mit", commit_message="first")
    card = ModelCard(hub.files("user/keywords")["README.md"].decode())
    assert "my-run" in card.data.tags and "replacement-learning" in card.data.tags and card.data.license == "mit"
    main_files = hub.files("user/keywords")
    with torch.no_grad():
        model.replacement_coefficients.get_parameter("1").add_(1)
    url = model.push_to_hub("user/keywords", create_pr=True)
    assert url.endswith("/user/keywords/discussions/1")
    assert hub.files("user/keywords") == main_files  # main unchanged: the change waits in the pull request
    assert hub.files("user/keywords", "refs/pr/1")["model.safetensors"] != main_files["model.safetensors"]


def test_save_pretrained_with_push_to_hub(hub_env, tmp_path):
    hub = hub_env()
    model = tiny_repl_model()
    model.save_pretrained(tmp_path / "run", push_to_hub=True, repo_id="user/saved-and-pushed", private=True)
    assert (tmp_path / "run" / "replacement_config.json").is_file()
    assert {"README.md", "replacement_config.json", "model.safetensors"} <= set(hub.files("user/saved-and-pushed"))


def test_from_pretrained_cache_dir_and_local_files_only(hub_env, tmp_path):
    hub = hub_env()
    model = tiny_repl_model()
    model.push_to_hub("user/cached")
    cache = tmp_path / "my-cache"
    x = torch.randn(2, 3, 16, 16)
    expected = model.eval()(pixel_values=x).logits
    downloaded = ReplacementModel.from_pretrained("user/cached", cache_dir=cache)
    assert any(cache.rglob("replacement_config.json"))
    hub.close()  # offline from here on: only the cache can answer
    offline = ReplacementModel.from_pretrained("user/cached", cache_dir=cache, local_files_only=True)
    for loaded in (downloaded, offline):
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=0, atol=0)
