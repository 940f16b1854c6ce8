"""The op-traffic meter of the bandwidth instrument: bytes each ATen op reads and writes, and the ceiling they set."""

from __future__ import annotations

import torch

from benchmarks.harness.bandwidth import PHASES, measure_phase_bandwidth, synthesis_traffic
from benchmarks.harness.measure import replaced_modules
from benchmarks.harness.methods import build_method_model
from benchmarks.harness.op_traffic import OpTrafficMeter, tensor_bytes
from hf_replacement.synthesis import synthesize


def test_meter_counts_reads_and_writes_per_op_and_skips_views_and_allocation():
    x, y = torch.randn(100, 8), torch.randn(100, 8, dtype=torch.float64)
    row = torch.randn(8)
    out = torch.empty(100, 8)
    meter = OpTrafficMeter()
    with meter:
        product = x * row  # reads 800 + 8 floats, writes 800
        product.add_(x.t().t())  # views: nothing; in place: reads 800 + 800, writes 800
        torch.mul(x, 2.0, out=out)  # reads 800, writes 800: the out tensor is not read
        torch.empty(1000)  # allocation only
        y.sum()  # reads 800 doubles, writes one
        out.copy_(x)  # reads 800, overwrites 800
    assert set(meter.ops) == {"mul", "add_", "sum", "copy_"}
    assert meter.ops["copy_"].bytes == 4 * 1600
    assert meter.ops["mul"].calls == 2 and meter.ops["mul"].bytes == 4 * (808 + 800) + 4 * (800 + 800)
    assert meter.ops["add_"].bytes == 4 * 2400
    assert meter.ops["sum"].bytes == 8 * 801
    assert meter.total_bytes == sum(record.bytes for record in meter.ops.values())
    assert [op["op"] for op in meter.heaviest(2)] == sorted(meter.ops, key=lambda n: -meter.ops[n].seconds)[:2]


def test_broadcast_dimensions_count_once():
    assert tensor_bytes(torch.randn(5, 1).expand(5, 7)) == 5 * 4
    assert tensor_bytes(torch.randn(3, 4).t()) == 12 * 4


def test_plain_neighbours_cost_five_passes_where_a_fused_kernel_needs_three():
    """ViT: every synthesized weight is `a·prev + b·next` of its own shape, one product and one in-place
    multiply-add per weight: read prev, write; read the result, read next, write. Five passes over the
    weight's bytes against the three a fused kernel needs (read both, write once): ceiling 3/5 in forward and
    rebuild, up to the coefficients' few bytes. Backward, per weight: two scaled copies of the gradient (read it
    twice, write two) and two dot products (read it twice more and both neighbours): 8 passes against 5."""
    model = build_method_model("repl-k4", "vit-mini", 10, 8, 3, seed=0).model
    modules = replaced_modules(model)
    results = measure_phase_bandwidth(model, modules, repeats=1)
    traffic = synthesis_traffic(modules)
    scalars = 4096  # bytes of 0-dim coefficients and the like: far less than one weight of the smallest block
    for phase, passes in (("forward", 5 / 3), ("rebuild", 5 / 3), ("backward", 8 / 5)):
        entry = results[phase]
        assert 0 <= entry["op_bytes"] - passes * traffic[phase] <= scalars
        assert entry["op_ceiling"] == traffic[phase] / entry["op_bytes"]
        assert 1 <= len(entry["heaviest_ops"]) <= 4
    assert set(results) == set(PHASES)


def test_resampled_neighbours_cost_more_passes_than_plain_ones():
    """convnext-mini: both replaced blocks sit at stage boundaries, where every tensor of one neighbour is resampled
    (at least one more pass, writing the resampled tensor, before the multiply-add): each phase's ceiling is below
    the 3/5 of neighbours of the weight's own shape; the resampling ops are metered, the same bytes every run."""
    model = build_method_model("repl-k4", "convnext-mini", 10, 8, 3, seed=0).model
    modules = replaced_modules(model)
    results = measure_phase_bandwidth(model, modules, repeats=1)
    traffic = synthesis_traffic(modules)
    for phase in PHASES:
        assert results[phase]["op_bytes"] > traffic[phase] / 0.6
        assert 0 < results[phase]["op_ceiling"] < 0.6
    meter = OpTrafficMeter()
    with meter, torch.no_grad():
        for module in modules:
            synthesize(module)
    # dense steps are matrix products, structured ones bags of rows or gathers: which, the shapes decide
    assert set(meter.ops) & {"mm", "_embedding_bag", "_embedding_bag_forward_only", "index_select"}
    assert meter.total_bytes == results["rebuild"]["op_bytes"]
