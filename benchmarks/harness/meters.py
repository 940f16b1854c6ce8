"""Instruments that count what a training step holds and does: state bytes, saved activations, synthesis calls.

They observe through PyTorch's and the library's public hooks only (saved-tensor hooks,
`hf_replacement.synthesis_hooks.register_synthesis_hook`), never by patching the library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from hf_replacement.synthesis_hooks import register_synthesis_hook


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def state_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of parameters, buffers, gradients and optimizer state, read from the tensors."""
    parameters = list(model.parameters())
    optimizer_tensors = [
        value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    ]
    result = {
        "parameters": _tensor_bytes(parameters),
        "buffers": _tensor_bytes(list(model.buffers())),
        "gradients": _tensor_bytes([p.grad for p in parameters if p.grad is not None]),
        "optimizer": _tensor_bytes(optimizer_tensors),
    }
    result["total"] = sum(result.values())
    return result


def parameter_state_bytes(parameters: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of `parameters` with their gradients and optimizer state: what freeing them saves."""
    optimizer_tensors = [
        value for p in parameters for value in optimizer.state.get(p, {}).values() if torch.is_tensor(value)
    ]
    return _tensor_bytes([*parameters, *(p.grad for p in parameters if p.grad is not None), *optimizer_tensors])


class SavedTensorMeter:
    """Bytes autograd keeps for backward while the meter is active, each storage counted once.

    Parameters (and anything in `exclude`) are left out: they are counted as state. A tensor saved
    twice, or two views of one storage (an op saving its output that the next op saves as input),
    count once.

    A replaced block under `recompute_replaced=True` runs inside a non-reentrant checkpoint, whose
    own saved-tensor hooks take over inside it (only the innermost hooks apply): what the block
    would have saved is not counted. What the checkpoint keeps instead, its inputs, it saves through
    an ordinary autograd node outside its hooks (torch/utils/checkpoint.py, "Nestable Checkpoint",
    rule 2), so this meter counts them with no help; `tests/test_benchmark.py` checks that.
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in self._exclude:
                self._storages[pointer] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._hooks.__exit__(*exc_info)


class SynthesisCounter:
    """Counts the weight syntheses of replaced blocks while active (a recompute synthesizes again in backward)."""

    def __init__(self) -> None:
        self.calls = 0

    def _count(self, module: nn.Module) -> None:
        self.calls += 1

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handle = register_synthesis_hook(self._count)
        try:
            yield
        finally:
            handle.remove()


def _convolution_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups,
    output_mask, out_shape=None, **kwargs,
) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs what its forward does.

    torch's own formula (2.13) counts the weight gradient as an ungrouped convolution: a depthwise 7x7
    convolution's backward came out about C times its forward (ConvNeXt-tiny, 64 px, batch 16: 67.8 GFLOP
    of a 101 GFLOP step, against 0.8 forward)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (matrix products and convolutions, 2 FLOPs a multiply-add), with grouped
    convolutions' backward counted right (`_convolution_backward_flops`)."""
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _convolution_backward_flops}
    )


def forward_flops_per_image(
    model: nn.Module, modules: Sequence[nn.Module], pixel_values: torch.Tensor, input_name: str = "pixel_values"
) -> list[float]:
    """Forward FLOPs per image (per sample: `input_name` names the model's input, e.g. a text model's
    `input_ids`) of each of `modules` (submodules of `model`), as they run inside `model`.

    The model runs once on `pixel_values` and once on them twice over (eval mode, no gradients),
    recording each module's arguments; each module then runs alone on both under
    `torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions, 2 FLOPs a
    multiply-add; element-wise work is not counted; attention runs as its plain matrix products, since
    the counter has no formula for the fused CPU kernel). The difference over the added images is the
    cost per image: what a module does once per call whatever the batch, such as a replaced
    block's weight synthesis (reported as its share of the step instead), drops out.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def counts(inputs: torch.Tensor) -> list[int]:
        arguments: dict[int, tuple[tuple, dict]] = {}

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            arguments.setdefault(id(module), (args, kwargs))

        handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in modules]
        try:
            model(**{input_name: inputs})
        finally:
            for handle in handles:
                handle.remove()
        totals = []
        for module in modules:
            args, kwargs = arguments[id(module)]
            with flop_counter() as counter, sdpa_kernel(SDPBackend.MATH):
                module(*args, **kwargs)
            totals.append(counter.get_total_flops())
        return totals

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            single, double = counts(pixel_values), counts(torch.cat([pixel_values, pixel_values]))
    finally:
        model.train(was_training)
    return [(two - one) / pixel_values.shape[0] for one, two in zip(single, double)]
