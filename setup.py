from setuptools import find_packages, setup

setup(
    name="hf-replacement",
    version="0.1.0",
    description="Replacement Learning (RepL) for Hugging Face Transformers vision models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hf_replacement", "hf_replacement.*"]),
    package_data={"hf_replacement": ["templates/*.md"]},
    python_requires=">=3.11",  # transformers 5.21 and later need 3.11
    # torch is pinned below 2.15: install the CPU or CUDA build you want first (see README).
    install_requires=[
        "torch>=2.6,<2.15",  # FSDP2 (torch.distributed.fsdp.fully_shard) is public from 2.6; tested with 2.11-2.14
        "transformers>=5.23,<6",  # v5 module paths and image processors; tested with 5.23-5.25
        "accelerate>=1.0",
        "datasets>=3.0",
        "peft>=0.17",  # tested with 0.21-0.22 (0.22 drops modules_to_save copies on unload: docs/transformers.md)
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "scikit-learn>=1.3",
        "pillow>=10",
        "tqdm>=4.60",
        "Jinja2>=3",  # model card template
    ],
    extras_require={
        # tensorboard: the logging tests read its event files; ruff: the linter CI runs;
        # pytest-timeout: a test that hangs fails with every thread's stack instead of stalling CI;
        # setuptools: the wheel test builds without isolation (offline), which needs bdist_wheel (setuptools 70.1+)
        "test": [
            "pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2.1", "matplotlib>=3.7", "tensorboard>=2.14", "ruff>=0.6",
            "setuptools>=70.1",
        ],
        "benchmark": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["hf-replacement=hf_replacement.commands.cli:main"]},
)
