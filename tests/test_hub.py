"""Hub sharing: the real `huggingface_hub` client against a loopback Hub (tests/hub_server.py).

Push (compact and merged), download with `ReplacementModel.from_pretrained` and with plain
Transformers, the model card, and every failure: server down, 401, 500, missing repo/revision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard, constants

from hf_replacement import ReplacementConfig, ReplacementModel, get_replacement_model
from hf_replacement.hub import TEMPLATE_PATH, HubDownloadError, HubPushError, push_to_hub, render_model_card
from hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_TestWriteToken1234567890abcd"
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_repl_model() -> ReplacementModel:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4, num_labels=3,
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
    assert torch.equal(logits(ReplacementModel.from_pretrained("user/repl-vit", revision=first_commit, token=TOKEN)), logits(loaded))

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
    model.push_to_hub("user/repl-vit", merged=True)
    assert "replacement_config.json" not in hub.files("user/repl-vit")

    # The caller's RepL model is unchanged: still replaced, same weights and coefficients.
    assert model.replaced_blocks == {1: "vit.layers.1"}
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())

    # Transformers downloads through huggingface_hub's import-time endpoint constants.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    plain = transformers.AutoModelForImageClassification.from_pretrained("user/repl-vit").eval()
    assert type(plain).__name__ == "ViTForImageClassification"
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-6, rtol=0)

    with pytest.raises(FileNotFoundError, match="not a RepL checkpoint.*AutoModelForImageClassification"):
        ReplacementModel.from_pretrained("user/repl-vit")


def test_model_card_metadata_and_body(hub_env, tmp_path):
    model = tiny_repl_model()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"accuracy": 0.8125, "updates": 40, "options": {"lr": 0.001}}')
    card = render_model_card(model, tmp_path / "run", base_model="google/vit-base-patch16-224", datasets=["digits"])
    parsed = ModelCard(str(card))  # what the Hub and ModelCard.load read back from README.md
    data = parsed.data
    assert data.library_name == "hf-replacement"
    assert "replacement-learning" in data.tags
    assert data.pipeline_tag == "image-classification"
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.datasets == ["digits"]
    assert data.metrics == ["accuracy"]
    assert data.eval_results[0].metric_value == 0.8125
    trainable, total = model.get_nb_trainable_parameters()
    for text in ("`vit.layers.1`", "| 0.3 | 0.8 |", f"{trainable:,d}", f"{model._num_unreplaced_parameters:,d}",
                 "| accuracy | 0.8125 |", "ReplacementModel.from_pretrained", f"transformers {transformers.__version__}"):
        assert text in parsed.text, text
    assert "lr" not in parsed.text  # nested run options stay in results.json

    merged = ModelCard(str(render_model_card(model, merged=True)))
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert merged.data.base_model is None and merged.data.metrics == ["accuracy"]
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
