"""wsm-megatron: Warmup-Stable and Merge (WSM) for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="wsm-megatron",
    version="0.1.0",
    description="WSM (Warmup-Stable and Merge) for Megatron-Core: constant-LR pre-training "
    "with shard-local checkpoint merging in place of LR decay",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships inside the package as wsm_megatron.configs, so wsm-demo finds tiny-cpu.yaml
    # in any install, not only in a source checkout.
    packages=[*find_packages(include=["wsm_megatron", "wsm_megatron.*"]), "wsm_megatron.configs"],
    package_dir={"wsm_megatron.configs": "configs"},
    package_data={"wsm_megatron.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<1",
        "numpy",
        "sentencepiece",
        "tokenizers",  # Hugging Face tokenizer.json and GPT-2 BPE; no transformers needed
        "pyyaml",
        "tqdm",
        "matplotlib",
        "psutil",
        "wandb",
        "rich",
        "xxhash",  # checksums of saved checkpoints (XXH3-64, at disk speed)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "triton"],
        "test": [
            "pytest",
            "pytest-xdist",
            "pytest-timeout",
            "triton",
            "ruff",
            "lm-eval>=0.4,<0.5",
            # wsm-export's output, read back (lm-eval's hf backend needs accelerate); none of
            # them requires a CUDA build of torch
            "transformers>=4.40",
            "safetensors",
            "accelerate",
        ],
        "eval": ["lm-eval>=0.4,<0.5", "transformers>=4.40", "safetensors", "accelerate"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "wsm-coeffs=wsm_megatron.cli.coeffs:main",
            "wsm-merge=wsm_megatron.cli.merge:main",
            "wsm-train=wsm_megatron.cli.train:main",
            "wsm-demo=wsm_megatron.cli.demo:main",
            "wsm-tune=wsm_megatron.cli.tune:main",
            "wsm-eval=wsm_megatron.cli.eval:main",
            "wsm-export=wsm_megatron.cli.export:main",
            "wsm-watch=wsm_megatron.cli.watch:main",
        ],
    },
)
