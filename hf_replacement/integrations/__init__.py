"""Integrations with other libraries: the Transformers Trainer, PEFT, FSDP2 and pipelines."""
