"""Named size presets, as timm names its model variants. Each value is a `LightClipConfig` kwargs dict."""

from __future__ import annotations

# Shortened text tower shared by the real-size presets (LightCLIP: accuracy does not rise with text-encoder size).
_TEXT_SMALL = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
    max_position_embeddings=77,
)

# Text tower of the default training preset: the real-size width and vocabulary, 2 layers.
_TEXT_LITE = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64,
)

# Text tower of the test-size presets: 2 layers, width 64, a 4,096-entry vocabulary.
_TEXT_XXS = dict(
    vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=64,
)


def _cnn_preset(backbone: str, **backbone_kwargs) -> dict:
    """A CNN image tower at 224 px with the shortened text tower and 256-d embeddings."""
    return dict(
        vision_config=dict(backbone=backbone, image_size=224, backbone_kwargs=backbone_kwargs),
        text_config=dict(_TEXT_SMALL),
        projection_dim=256,
        pretraining_config=dict(token_dim=256),
    )


def _lite0_preset(text_config: dict, embed_dim: int, image_size: int) -> dict:
    """EfficientNet-Lite0 at `image_size` with the given text tower and embedding width."""
    return dict(
        vision_config=dict(backbone="efficientnet-lite", image_size=image_size,
                           backbone_kwargs=dict(width_multiplier=1.0, depth_multiplier=1.0, drop_connect_rate=0.2)),
        text_config=dict(text_config),
        projection_dim=embed_dim,
        pretraining_config=dict(token_dim=embed_dim),
    )


PRESETS: dict[str, dict] = {
    # test-size model: 32 px, 2 + 2 layers, width 64
    "lightclip-xxs": dict(
        vision_config=dict(
            backbone="vit", image_size=32, patch_size=8, hidden_size=64, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2,
        ),
        text_config=dict(_TEXT_XXS),
        projection_dim=64,
        pretraining_config=dict(token_dim=64),
    ),
    # the xxs text tower with a 0.29 M-parameter native CNN at 32 px, trained from scratch
    "lightclip-xxs-cnn": dict(
        vision_config=dict(backbone="convnet", image_size=32, backbone_kwargs=dict(widths=[32, 64, 128])),
        text_config=dict(_TEXT_XXS),
        projection_dim=64,
        pretraining_config=dict(token_dim=64),
    ),
    # EfficientNet-Lite0 at 64 px (started from its released ImageNet weights) with the xxs text tower
    "lightclip-xxs-lite0": _lite0_preset(_TEXT_XXS, embed_dim=64, image_size=64),
    # the same image tower with a 2-layer, width-256 text tower and 256-d embeddings
    "lightclip-lite0-64px": _lite0_preset(_TEXT_LITE, embed_dim=256, image_size=64),
    # the default of `examples/pretrain.py`: the same model at 56 px (docs/results.md)
    "lightclip-lite0-56px": _lite0_preset(_TEXT_LITE, embed_dim=256, image_size=56),
    # ViT-XS: width 256, 6 layers, patch 16 at 224 px (about 4.8 M parameters), the CLIP-PING headline class
    "lightclip-xs": dict(
        vision_config=dict(
            backbone="vit", image_size=224, patch_size=16, hidden_size=256, intermediate_size=1024,
            num_hidden_layers=6, num_attention_heads=4,
        ),
        text_config=dict(_TEXT_SMALL),
        projection_dim=256,
        pretraining_config=dict(token_dim=256),
    ),
    "lightclip-mobilenetv2": _cnn_preset("mobilenetv2", depth_multiplier=1.0),
    "lightclip-efficientnet-b0": _cnn_preset(
        "efficientnet", width_coefficient=1.0, depth_coefficient=1.0, dropout_rate=0.2),
    # the native EfficientNet-Lite0 (3.37 M tower parameters, 1280-d features) at 224 px: the released ImageNet weights
    # load into it with `lightclip.pretrained_towers.load_efficientnet_lite_imagenet`, and its processor normalises
    # as they expect ((x - 127) / 128)
    "lightclip-efficientnet-lite0": _cnn_preset(
        "efficientnet-lite", width_multiplier=1.0, depth_multiplier=1.0, drop_connect_rate=0.2),
}


def list_presets() -> list[str]:
    """Names accepted by `LightClipConfig.from_preset` and `LightClipProcessor.from_preset`."""
    return sorted(PRESETS)
