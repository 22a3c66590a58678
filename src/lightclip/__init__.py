"""lightclip: lightweight CLIP dual encoders for transformers, trained with the LightCLIP and CLIP-PING recipes.

Importing the package registers its config, model, image processor and processor with the transformers Auto classes,
so `pipeline("zero-shot-image-classification", model=path)` and `AutoModel.from_pretrained(path)` work.
Training-only code (`lightclip.pretraining`, `lightclip.objectives`, `lightclip.neighbors`) is imported on first use.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_lightclip import (
    LightClipConfig,
    LightClipPretrainingConfig,
    LightClipTextConfig,
    LightClipVisionConfig,
    resolve_objectives,
)
from .modeling_lightclip import LightClipModel, LightClipOutput, LightClipPreTrainedModel, LightClipVisionModelOutput
from .presets import list_presets
from .processing_lightclip import LightClipImageProcessor, LightClipProcessor, build_default_tokenizer

__version__ = "0.1.0"

AutoConfig.register("lightclip", LightClipConfig, exist_ok=True)
AutoConfig.register("lightclip_text_model", LightClipTextConfig, exist_ok=True)
AutoConfig.register("lightclip_vision_model", LightClipVisionConfig, exist_ok=True)
AutoConfig.register("lightclip_pretraining", LightClipPretrainingConfig, exist_ok=True)
AutoModel.register(LightClipConfig, LightClipModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(LightClipConfig, LightClipModel, exist_ok=True)
AutoImageProcessor.register(LightClipConfig, image_processor_classes={"pil": LightClipImageProcessor}, exist_ok=True)
AutoProcessor.register(LightClipConfig, LightClipProcessor, exist_ok=True)

# `save_pretrained` copies the inference files next to the weights and writes `auto_map`, so users without the
# package can load with `trust_remote_code=True` (the copied files import nothing but each other and transformers).
LightClipConfig.register_for_auto_class()
LightClipModel.register_for_auto_class("AutoModel")
LightClipImageProcessor.register_for_auto_class("AutoImageProcessor")
LightClipProcessor.register_for_auto_class("AutoProcessor")

_LAZY = {"LightClipForPreTraining": "pretraining", "LightClipForPreTrainingOutput": "pretraining"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lightclip' has no attribute {name!r}")


__all__ = [
    "LightClipConfig", "LightClipPretrainingConfig", "LightClipTextConfig", "LightClipVisionConfig", "LightClipModel",
    "LightClipOutput", "LightClipPreTrainedModel", "LightClipVisionModelOutput", "LightClipImageProcessor",
    "LightClipProcessor", "LightClipForPreTraining", "LightClipForPreTrainingOutput", "build_default_tokenizer",
    "list_presets", "resolve_objectives",
]
