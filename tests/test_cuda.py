"""RepL on a CUDA device: same numbers as on the CPU, bf16 autocast, checkpoints across devices.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest -q tests/test_cuda.py`.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch

from hf_replacement import ReplacementConfig, ReplacementModel, get_replacement_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARCHITECTURES = ["vit", "convnext"]


def replacement_model(arch: str, surrogate: str = "block") -> ReplacementModel:
    model = tiny_models.build(arch)
    config = ReplacementConfig(replace_interval=3, block_path=tiny_models.block_path(arch), surrogate=surrogate)
    return get_replacement_model(model, config)


def forward_backward(model: ReplacementModel, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = tiny_models.logits(model(pixel_values=tiny_models.inputs().to(device)))
    logits.pow(2).mean().backward()
    return logits.detach().cpu(), {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


@pytest.mark.parametrize("surrogate", ["block", "half"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_matches_cpu(arch, surrogate):
    cpu_model = replacement_model(arch, surrogate)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    # TF32 matmuls would differ from the CPU by ~1e-3: compare full fp32.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cpu_logits, cpu_grads = forward_backward(cpu_model, "cpu")
        cuda_logits, cuda_grads = forward_backward(cuda_model, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(cuda_logits, cpu_logits, rtol=1e-4, atol=1e-5)
    assert cuda_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("surrogate", ["block", "half"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_bf16_autocast_keeps_fp32_coefficients(arch, surrogate):
    model = replacement_model(arch, surrogate).cuda()
    with torch.no_grad():
        fp32 = tiny_models.logits(model(pixel_values=tiny_models.inputs().cuda()))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tiny_models.logits(model(pixel_values=tiny_models.inputs().cuda()))
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp32, rtol=0.05, atol=0.05)
    for coefficients in model.replacement_coefficients.parameters():
        assert coefficients.dtype == torch.float32
        assert (
            coefficients.grad is not None
            and torch.isfinite(coefficients.grad).all()
            and coefficients.grad.abs().sum() > 0
        )


def test_cuda_checkpoint_loads_on_cpu(tmp_path):
    model = replacement_model("vit").cuda()
    model.save_pretrained(tmp_path)
    loaded = ReplacementModel.from_pretrained(tmp_path)
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, msg=name)
    x = tiny_models.inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_models.logits(loaded(pixel_values=x)),
            tiny_models.logits(model(pixel_values=x.cuda())).cpu(),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.slow
def test_trainer_under_fsdp_trains_as_one_process_and_saves_repl_checkpoints(tmp_path):
    """TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2}): ReplacementTrainer shards the model in
    RepL units; the weights match an unsharded run of the same global batch and every save is a RepL checkpoint."""
    import os

    from processes import launch, torchrun
    from safetensors.torch import load_file

    processes = min(2, torch.cuda.device_count())
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_trainer_run.py")

    def run(output_dir, mode: str, process_count: int, batch_size: int) -> None:
        launch([torchrun(script, str(output_dir), mode, str(batch_size), processes=process_count)], output_dir.parent,
               timeout=600, cpu=False)  # fmt: skip

    run(tmp_path / "fsdp", "fsdp", processes, 4)
    run(tmp_path / "plain", "plain", 1, 4 * processes)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    for directory in (tmp_path / "fsdp", tmp_path / "fsdp" / "checkpoint-4"):
        loaded = ReplacementModel.from_pretrained(directory)  # a whole RepL checkpoint, whatever was sharded
        assert loaded.replaced_blocks == {1: "vit.layers.1"}
    sharded = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert sharded.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], rtol=0, atol=2e-4, msg=key)
