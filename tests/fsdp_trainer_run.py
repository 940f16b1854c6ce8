"""ReplacementTrainer with or without TrainingArguments(fsdp=...), launched by tests/test_cuda.py under torchrun.

`python -m torch.distributed.run --nproc_per_node N tests/fsdp_trainer_run.py OUTPUT_DIR fsdp|plain BATCH`:
a tiny ViT (block 1 of 4 replaced), 8 updates of AdamW on random 1x8x8 images, checkpoints every 4.
"""

from __future__ import annotations

import sys

import datasets
import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from hf_replacement import ReplacementConfig, ReplacementTrainer, get_replacement_model


def main(output_dir: str, mode: str, batch_size: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # compared with a run of another process count
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=8,
        patch_size=4, num_channels=1, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = get_replacement_model(ViTForImageClassification(config), ReplacementConfig(replace_interval=2))
    generator = torch.Generator().manual_seed(1)
    data = datasets.Dataset.from_dict(
        {
            "pixel_values": torch.randn(64, 1, 8, 8, generator=generator).tolist(),
            "labels": torch.randint(0, 10, (64,), generator=generator).tolist(),
        }
    ).with_format("torch")
    sharding = {"fsdp": "full_shard", "fsdp_config": {"version": 2}} if mode == "fsdp" else {}
    args = TrainingArguments(
        output_dir, per_device_train_batch_size=batch_size, learning_rate=1e-2, max_steps=8, save_steps=4,
        logging_steps=1, seed=0, data_seed=0, report_to=[], disable_tqdm=True, **sharding,
    )  # fmt: skip
    trainer = ReplacementTrainer(model, args, train_dataset=data)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
