"""RepL benchmarks: RepL against ordinary training and its alternatives, same model/data/seed, one run.

Run from a checkout (not installed with `hf_replacement`):

- `python -m benchmarks --suite quick|fashion-mnist|gpu` trains and measures every method of a suite
  (`harness/`), writes `benchmarks/<suite>/` and rewrites `benchmarks/README.md`;
- `python -m benchmarks --readme` only rewrites the README from the results on disk;
- `python benchmarks/synthesis_overhead.py` times weight synthesis, the shipped fused implementation
  against the plain-autograd reference, and writes `benchmarks/synthesis_overhead.{json,md}`.

The harness uses only `hf_replacement`'s public API and the training steps the launcher uses
(`hf_replacement.commands.training_steps`), so what it measures is what a user's training does.
"""
