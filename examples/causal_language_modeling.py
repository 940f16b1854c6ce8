"""Causal language modelling with Replacement Learning: a GPT-2 from a config, trained on the Python
standard library's own source, with `ReplacementTrainer`.

    python examples/causal_language_modeling.py --output-dir outputs/clm

A few minutes on 2 CPU cores, offline: the text is the standard library's `.py` files (see
task_data.py), tokenized as UTF-8 bytes. An 8-block GPT-2 (128 wide) is trained from scratch with
block 3 replaced (`replace_interval=4`: it synthesizes its weights from blocks 2 and 4; block 7,
the last, has no next neighbour). It prints the held-out perplexity per byte and a sampled
continuation, then saves, reloads with `ReplacementModel.from_pretrained`, merges, and reloads the
merged model as a plain `GPT2LMHeadModel` with identical logits. `--smoke`: a tiny run (tests).
"""

from __future__ import annotations

import argparse
import math

import torch
from example_setup import example_parser, train
from round_trip import check_round_trip
from task_data import BYTE_VOCABULARY_SIZE, byte_blocks, decode, stdlib_text
from transformers import GPT2Config, GPT2LMHeadModel

from hf_replacement import ReplacementConfig, get_replacement_model

PROMPT = 'def main():\n    """'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__.split("\n\n")[0], output_dir="outputs/clm", max_steps=400, lr=1e-3)
    parser.add_argument("--block-length", type=int, default=128, help="bytes per training sample")
    parser.add_argument("--eval-blocks", type=int, default=128, help="held-out samples for the perplexity")
    return parser.parse_args(argv)


def build_model(smoke: bool) -> GPT2LMHeadModel:
    width, layers = (32, 4) if smoke else (128, 8)
    config = GPT2Config(
        vocab_size=BYTE_VOCABULARY_SIZE,
        n_positions=256,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        bos_token_id=10,
        eos_token_id=10,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.smoke:
        args.max_steps, args.batch_size, args.eval_blocks, args.replace_interval = 2, 2, 4, 2
    torch.manual_seed(args.seed)
    train_text = stdlib_text("train", max_bytes=args.max_steps * args.batch_size * args.block_length)
    train_blocks = byte_blocks(train_text, args.block_length)
    evaluation = byte_blocks(stdlib_text("test", max_bytes=args.eval_blocks * args.block_length), args.block_length)
    model = get_replacement_model(build_model(args.smoke), ReplacementConfig(replace_interval=args.replace_interval))
    model.print_trainable_parameters()
    trainer = train(model, args, train_blocks, eval_dataset=evaluation)
    perplexity = math.exp(trainer.evaluate()["eval_loss"])
    print(f"held-out perplexity per byte: {perplexity:.3f} ({len(evaluation)} blocks of {args.block_length} bytes)")
    prompt = torch.tensor([list(PROMPT.encode())])
    sample = model.generate(prompt, max_new_tokens=60, do_sample=False, pad_token_id=0)
    print(f"greedy continuation: {decode(sample[0])!r}")
    check_round_trip(trainer, {"input_ids": evaluation[0]["input_ids"][None]}, GPT2LMHeadModel)
    return perplexity


if __name__ == "__main__":
    main()
