"""The `hf-replacement` command: the launcher (train, evaluate, merge), an application of the library."""
