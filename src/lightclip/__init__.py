"""lightclip: lightweight CLIP dual encoders for transformers, trained with the LightCLIP and CLIP-PING recipes."""

from .configuration_lightclip import LightClipConfig, LightClipTextConfig, LightClipVisionConfig
from .presets import list_presets

__version__ = "0.1.0"
