"""The CNN image towers of `LightClipModel`, and what prepares them for training and inference.

- `LightClipConvVisionTower`: a CNN as image tower (its flattened last feature map as tokens, their mean as the
  pooled output), one of the native `LightClipConvNet` and `LightClipEfficientNetLite` or a transformers MobileNetV2
  / EfficientNet; `fuse()` folds its zero padding and BatchNorm into the convolutions for inference, and an
  inference forward (eval mode, no autograd) runs a cached fused copy of its own.
- `keep_freed_memory_in_heap`: glibc malloc settings that spare a CNN's large feature maps a page fault per call.
- `LightClipFrozenBatchNorm2d` and `freeze_batch_norm_2d`: BatchNorm with fixed statistics and affine, for the groups
  a locked tower does not train (`lightclip.trainer_utils.lock_image_tower`).

Like `modeling_lightclip.py`, which builds these towers, this file is copied next to a checkpoint for
`trust_remote_code=True` users: it imports nothing but transformers and its sibling files.
"""

import copy
import ctypes
import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_lightclip import EFFICIENTNET_LITE_HIDDEN_SIZE, LightClipVisionConfig
from .modeling_lightclip_outputs import LightClipVisionModelOutput, check_pixel_values


def _run_groups(groups: list[nn.Module], pixel_values: torch.Tensor,
                output_hidden_states: bool) -> BaseModelOutputWithPooling:
    """The native CNNs' forward: the groups in order; the last feature map and, on request, the input and every
    group's output, like transformers' CNNs."""
    states, hidden = (pixel_values,) if output_hidden_states else None, pixel_values
    for group in groups:
        hidden = group(hidden)
        if output_hidden_states:
            states += (hidden,)
    return BaseModelOutputWithPooling(last_hidden_state=hidden, hidden_states=states)


class LightClipConvNet(nn.Module):
    """The native small CNN (`backbone="convnet"`): per stage a 3x3 conv and a stride-2 3x3 conv, each followed by
    BatchNorm and ReLU. Returns the last feature map and, on request, every stage's output, like transformers' CNNs.
    """

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        stages, width = [], config.num_channels
        for out in config.convnet_widths():
            stages.append(nn.Sequential(*self._conv(width, out, stride=1), *self._conv(out, out, stride=2)))
            width = out
        self.stages = nn.ModuleList(stages)

    def groups(self) -> list[nn.Module]:
        """The stages in input-to-output order (for locking, as `LightClipEfficientNetLite.groups`)."""
        return list(self.stages)

    @staticmethod
    def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        return _run_groups(self.groups(), pixel_values, output_hidden_states)


class Conv2dSame(nn.Conv2d):
    """A bias-free `nn.Conv2d` with TensorFlow's "SAME" padding, as the released EfficientNet-Lite weights expect.

    The output has `ceil(size / stride)` pixels. Total padding per side pair is
    `max((ceil(size / stride) - 1) * stride + kernel - size, 0)`, split floor / ceil with the extra pixel on the right
    and bottom. At stride 1 (odd kernels) that is `(kernel - 1) / 2` on each side for every input size, so torch's own
    padding does it; at stride 2 it depends on the input size and is computed at every call (any input size works).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        static = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, static, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, self.same_padding(x.shape[-2:]))
        return super().forward(x)

    def same_padding(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The zero padding (left, right, top, bottom, as `F.pad` takes it) of an input of spatial `size` (H, W)."""
        return (*tf_same_padding(size[1], self.kernel_size[1], self.stride[1]),
                *tf_same_padding(size[0], self.kernel_size[0], self.stride[0]))


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" zero padding of one spatial dimension, (before, after): `ceil(size / stride)` outputs, the odd
    pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> nn.Sequential:
    """Conv2dSame, BatchNorm with TensorFlow's momentum 0.99 (0.01 in torch) and eps 1e-3, then ReLU6 (if `act`)."""
    layers = [("conv", Conv2dSame(in_channels, out_channels, kernel_size, stride, groups)),
              ("bn", nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.01))]
    if act:
        layers.append(("act", nn.ReLU6(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class LightClipMBConv(nn.Module):
    """EfficientNet-Lite's mobile inverted bottleneck (no squeeze-excite, ReLU6): 1x1 expansion (absent when
    `expand_ratio` is 1), depthwise `kernel_size` conv at `stride`, linear 1x1 projection; a residual connection when
    the shape is kept, with drop-connect (per-sample stochastic depth at `drop_rate`) on it in training."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int,
                 drop_rate: float):
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = _conv_bn_act(in_channels, mid, 1) if expand_ratio != 1 else None
        self.depthwise = _conv_bn_act(mid, mid, kernel_size, stride, groups=mid)
        self.project = _conv_bn_act(mid, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.expand(inputs) if self.expand is not None else inputs
        x = self.project(self.depthwise(x))
        if not self.residual:
            return x
        if self.training and self.drop_rate > 0:
            keep = 1 - self.drop_rate
            mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).add_(keep).floor_()
            x = x * mask / keep
        return x + inputs


# EfficientNet-B0's block table, shared by Lite0..4: (repeats, kernel, stride, expand ratio, output channels) per stage
EFFICIENTNET_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                       (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def efficientnet_round_filters(channels: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channels scaled by `width_multiplier`, rounded to the nearest multiple of `divisor`, never more than 10 % down
    (TF EfficientNet's `round_filters`)."""
    scaled = channels * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


class LightClipEfficientNetLite(nn.Module):
    """The native EfficientNet-Lite (`backbone="efficientnet-lite"`), layer for layer the released TF model, so its
    ImageNet weights load (`lightclip.pretrained_towers.load_efficientnet_lite_imagenet`) and give the same outputs.

    Stem (3x3 stride-2 conv to 32 channels, BatchNorm, ReLU6), the 7 MBConv stages of EfficientNet-B0's block table,
    head (1x1 conv to 1280, BatchNorm, ReLU6). Lite differs from B0 by ReLU6 for swish, no squeeze-excite, and a stem,
    head and first / last stage depth that `width_multiplier` / `depth_multiplier` do not scale; the other stage
    widths are rounded to multiples of 8 and their depths rounded up. Convolutions pad as TensorFlow's "SAME".
    Drop-connect grows linearly with the block index, from 0 to `drop_connect_rate` * (n - 1) / n.

    Returns the head's feature map and, on request, the input and the output of each of `groups()`, in order.
    """

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        self.config = config
        kwargs = config.efficientnet_lite_kwargs()
        width, depth = kwargs["width_multiplier"], kwargs["depth_multiplier"]
        repeats = [r if i in (0, len(EFFICIENTNET_STAGES) - 1) else math.ceil(r * depth)
                   for i, (r, *_) in enumerate(EFFICIENTNET_STAGES)]
        total, index, channels = sum(repeats), 0, 32
        self.stem = _conv_bn_act(config.num_channels, channels, 3, stride=2)
        stages = []
        for (_, kernel, stride, expand, out), count in zip(EFFICIENTNET_STAGES, repeats):
            out = efficientnet_round_filters(out, width)
            blocks = []
            for i in range(count):
                rate = kwargs["drop_connect_rate"] * index / total
                blocks.append(LightClipMBConv(channels, out, kernel, stride if i == 0 else 1, expand, rate))
                channels, index = out, index + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = _conv_bn_act(channels, EFFICIENTNET_LITE_HIDDEN_SIZE, 1)

    def groups(self) -> list[nn.Module]:
        """The layer groups in input-to-output order: stem, the 7 stages, head. Freezing all but the last N of them is
        open_clip's `lock_image_tower(unlocked_groups=N)`."""
        return [self.stem, *self.stages, self.head]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        return _run_groups(self.groups(), pixel_values, output_hidden_states)


class LightClipConvVisionTower(nn.Module):
    """A CNN as image tower: the native `LightClipConvNet` or `LightClipEfficientNetLite`, or a transformers CNN
    (MobileNetV2 or EfficientNet, no torchvision).

    The last feature map, flattened, gives the tokens; their mean is the pooled output.

    The convolutions run in `memory_format`, `torch.channels_last` by default, in training as in inference: on one CPU
    thread it speeds up eager inference of every CNN preset (`benchmarks/RESULTS.md`) and made a training step about
    1.35x faster (MobileNetV2 at 224 px, EfficientNet-Lite0 at 64 px, BatchNorm in train mode), and it is the layout of
    tensor-core convolutions on GPUs. Set the attribute to `torch.contiguous_format` to opt out.

    An inference forward (eval mode, autograd off: `torch.no_grad()` or `torch.inference_mode()`) runs a fused copy of
    the tower (`inference_tower`): on one CPU thread it takes about half the time of the layers as they are, and the
    embeddings agree to float rounding. The copy is built on the first such call, kept outside the module tree (no
    parameter, state dict key or checkpoint sees it), and rebuilt when any weight or statistic changes. Training,
    gradients and a grad-enabled eval forward run the layers themselves. `auto_fuse = False` opts out; `fuse()` fuses
    the tower itself in place, for inference only.
    """

    memory_format: torch.memory_format = torch.channels_last
    is_fused: bool = False
    auto_fuse: bool = True
    # how many of `backbone.groups()`, from the input, `train()` leaves in eval mode (`lock_image_tower` sets it)
    frozen_groups: int = 0

    def __init__(self, config: LightClipVisionConfig):
        super().__init__()
        self.config = config
        if config.backbone == "convnet":
            self.backbone = LightClipConvNet(config)
        elif config.backbone == "efficientnet-lite":
            self.backbone = LightClipEfficientNetLite(config)
        elif config.backbone == "mobilenetv2":
            from transformers import MobileNetV2Model

            self.backbone = MobileNetV2Model(config.backbone_config(), add_pooling_layer=False)
        else:
            from transformers import EfficientNetModel

            self.backbone = EfficientNetModel(config.backbone_config())
            self.backbone.pooler = None  # we pool ourselves; keeps the checkpoint free of an unused layer
        self.apply_memory_format()  # before any optimiser or DDP wrapper sees the parameters

    def train(self, mode: bool = True) -> "LightClipConvVisionTower":
        """`nn.Module.train`, except for the first `frozen_groups` groups, which stay in eval mode: a locked group
        with frozen BatchNorm is a fixed feature extractor and computes what it computes at inference (no
        drop-connect). Drops the fused copy of `inference_tower`, whichever the mode."""
        self._drop_fused_copy()
        super().train(mode)
        if self.frozen_groups:  # only a native CNN lists groups
            for group in self.backbone.groups()[:self.frozen_groups]:
                group.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply` (`to()`, `float()`, `cuda()`, ...), dropping the fused copy, which the weights left."""
        self._drop_fused_copy()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """The module's state without the fused copy: a deep copy or pickle rebuilds it on demand."""
        state = super().__getstate__()
        state.pop("_fused_copy", None)
        return state

    def inference_tower(self) -> "LightClipConvVisionTower":
        """The tower an inference forward runs: a fused copy (`fuse()`) in eval mode with autograd off, else `self`.

        The copy is cached with the address and version counter of every parameter and buffer, so an optimiser step,
        `load_state_dict` or a dtype / device move (all of which bump or replace them) rebuild it on the next call;
        `train()` / `eval()` and `to()` drop it. A write through `.data` bypasses version counters: call `.eval()`
        after one. Forward hooks on BatchNorm layers do not run in the copy, which has none."""
        if (self.training or self.is_fused or not self.auto_fuse or torch.is_grad_enabled()
                or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return self
        key = self._weights_key()
        cached = self.__dict__.get("_fused_copy")
        if cached is None or cached[0] != key:
            self._drop_fused_copy()  # kept out of the deep copy, and freed before the new one is built
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
                cached = (key, copy.deepcopy(self).fuse())
            self.__dict__["_fused_copy"] = cached  # a plain attribute, never a submodule
        return cached[1]

    def _drop_fused_copy(self) -> None:
        self.__dict__.pop("_fused_copy", None)

    def _weights_key(self) -> tuple:
        """What `inference_tower`'s copy was built from: every parameter's and buffer's address and version."""
        tensors = _tensors_of(self, [])
        try:
            return self.memory_format, *((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors (a model built under `inference_mode`) keep no version counter
            return self.memory_format, *(t.data_ptr() for t in tensors)

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        check_pixel_values(pixel_values, self.config)
        if self.training and self.is_fused:
            raise RuntimeError("this image tower was fused for inference (fuse() folded its BatchNorm layers away) and "
                               "cannot run in training mode; call .eval(), or load the unfused checkpoint to train")
        tower = self.inference_tower()
        if tower.is_fused and pixel_values.device.type == "cpu":
            keep_freed_memory_in_heap()
        return tower._run_backbone(pixel_values, output_hidden_states)

    def _run_backbone(self, pixel_values: torch.Tensor, output_hidden_states: bool
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`forward_features` on this tower's own layers."""
        self.apply_memory_format()
        pixel_values = pixel_values.contiguous(memory_format=self.memory_format)
        if self.config.backbone == "efficientnet":
            embeddings = self.backbone.embeddings(pixel_values)
            out = self.backbone.encoder(embeddings, output_hidden_states=output_hidden_states, return_dict=True)
        elif self.config.backbone in ("convnet", "efficientnet-lite"):  # the native CNNs
            out = self.backbone(pixel_values, output_hidden_states)
        else:
            out = self.backbone(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        tokens = out.last_hidden_state.flatten(2).transpose(1, 2)
        stages = tuple(h.flatten(2).transpose(1, 2) for h in out.hidden_states) if output_hidden_states else None
        return tokens, stages

    def apply_memory_format(self) -> None:
        """Lay the convolution weights out in `memory_format`, unless they already are. Loading a checkpoint gives
        contiguous tensors, so `from_pretrained` and every forward call this (a stride check when nothing changes)."""
        first = next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))
        if not first.weight.is_contiguous(memory_format=self.memory_format):
            self.backbone.to(memory_format=self.memory_format)

    @torch.no_grad()
    def fuse(self) -> "LightClipConvVisionTower":
        """Reparameterise the tower for inference, in place: TensorFlow "SAME" zero padding moves into the
        convolutions (`pad_into_conv`), every BatchNorm folds into the convolution before it (`fuse_conv_bn`), and the
        activations after them run in place. The outputs stay equal to float rounding; eager inference gets faster
        (`benchmarks/RESULTS.md`). An unfused tower runs such a copy at inference anyway (`inference_tower`);
        fusing in place drops the unfused weights, and a fused tower can no longer train or be saved."""
        if self.training:
            raise RuntimeError("fuse() folds BatchNorm's running statistics into the convolutions: call .eval() first")
        if not self.is_fused:
            self._drop_fused_copy()
            self._fold_same_padding()
            fuse_conv_bn(self.backbone)
            self.is_fused = True
            self.apply_memory_format()
        return self

    def _fold_same_padding(self) -> None:
        """Move each explicit zero padding before a strided convolution into that convolution. Where the padding
        depends on the input size (MobileNetV2's `tf_padding`, `Conv2dSame`), the sizes come from one forward of a
        blank picture at `image_size`, the only size the tower accepts."""
        backbone = self.backbone
        if self.config.backbone == "efficientnet":
            from transformers.models.efficientnet.modeling_efficientnet import (
                EfficientNetDepthwiseLayer,
                EfficientNetEmbeddings,
            )

            for module in backbone.modules():
                if isinstance(module, EfficientNetEmbeddings):
                    module.convolution = pad_into_conv(module.convolution, module.padding.padding)
                    module.padding = nn.Identity()
                elif isinstance(module, EfficientNetDepthwiseLayer) and module.stride == 2:  # only then it pads
                    module.depthwise_conv = pad_into_conv(module.depthwise_conv, module.depthwise_conv_pad.padding)
                    module.depthwise_conv_pad = nn.Identity()
            return
        if self.config.backbone == "efficientnet-lite":
            targets = {name: m for name, m in backbone.named_modules() if isinstance(m, Conv2dSame) and m.stride[0] > 1}
        elif self.config.backbone == "mobilenetv2" and backbone.config.tf_padding:
            from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import MobileNetV2ConvLayer

            targets = {name: m for name, m in backbone.named_modules() if isinstance(m, MobileNetV2ConvLayer)}
            if any(m.convolution.dilation != (1, 1) or m.config is not backbone.config for m in targets.values()):
                return  # a dilated MobileNetV2 (output_stride < 32) keeps its padding
        else:
            return
        sizes = self._input_sizes(list(targets.values()))
        for name, module in targets.items():
            if isinstance(module, Conv2dSame):
                backbone.set_submodule(name, pad_into_conv(module, module.same_padding(sizes[module])))
            else:
                conv = module.convolution
                pads = (*tf_same_padding(sizes[module][1], conv.kernel_size[1], conv.stride[1]),
                        *tf_same_padding(sizes[module][0], conv.kernel_size[0], conv.stride[0]))
                module.convolution = pad_into_conv(conv, pads)
        if self.config.backbone == "mobilenetv2":
            backbone.config.tf_padding = False  # the padding is in every convolution now

    def _input_sizes(self, modules: list[nn.Module]) -> dict[nn.Module, tuple[int, int]]:
        """The spatial size (H, W) of each module's input in a forward of a blank batch-1 picture."""
        sizes = {}

        def record(module: nn.Module, args: tuple) -> None:
            sizes[module] = tuple(args[0].shape[-2:])

        hooks = [m.register_forward_pre_hook(record) for m in modules]
        weight = next(self.backbone.parameters())
        size = self.config.image_size
        try:
            self._run_backbone(torch.zeros(1, self.config.num_channels, size, size, dtype=weight.dtype,
                                           device=weight.device), False)
        finally:
            for hook in hooks:
                hook.remove()
        return sizes

    def forward_head(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return last_hidden_state.mean(dim=1), last_hidden_state

    def forward_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`forward(...).pooler_output` `(batch, width)`, as the ViT tower's (a CNN computes nothing extra for it)."""
        return self.forward_head(self.forward_features(pixel_values)[0])[0]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> LightClipVisionModelOutput:
        tokens, stages = self.forward_features(pixel_values, output_hidden_states)
        pooled, patches = self.forward_head(tokens)
        return LightClipVisionModelOutput(
            last_hidden_state=tokens, pooler_output=pooled, patch_tokens=patches, hidden_states=stages
        )


def _tensors_of(module: nn.Module, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every parameter and buffer of `module` and its submodules, appended to `out`: what `parameters()` and
    `buffers()` give, in a fifth of their time (they build names and a memo), since `inference_tower` asks per call."""
    out += (t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
    for child in module._modules.values():
        if child is not None:
            _tensors_of(child, out)
    return out


# glibc's `mallopt` parameters (malloc.h) and the value lightclip gives both: far above any feature map it allocates
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_THRESHOLD = 1 << 30
_malloc_tuned: bool | None = None  # None until the first inference forward on the CPU asks


def keep_freed_memory_in_heap() -> bool:
    """Once per process, raise glibc's mmap and trim thresholds to `MALLOC_THRESHOLD` (1 GiB), so that freed feature
    maps stay in the heap for the next call. Returns whether the process runs with them.

    glibc serves every block above its mmap threshold (at most 32 MiB) from a mapping of its own and unmaps it when
    freed, so a CNN's largest feature maps (77 MB in MobileNetV2 at batch 16, 224 px) are page-faulted in and zeroed by
    the kernel on every call: 33,000 minor faults per call, about a third of the fused MobileNetV2 tower's time on one
    thread. With the thresholds raised a call after the first faults no page in. This is what the environment
    variables `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` set; the price is the same, for the whole process:
    freed memory is kept up to the largest working set so far (as ONNX Runtime's arena keeps it), instead of going
    back to the system. Only the main thread's heap keeps them: glibc's per-thread arenas still give large blocks
    back (`MALLOC_ARENA_MAX=1` makes threads share the main heap).

    Nothing is changed off glibc (macOS, Windows, musl, Android), when `LIGHTCLIP_NO_MALLOPT=1`, or when the process
    already chose its malloc settings (`MALLOC_*_` variables or `glibc.malloc` tunables in `GLIBC_TUNABLES`)."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = _set_glibc_malloc_thresholds(MALLOC_THRESHOLD)
    return _malloc_tuned


def _set_glibc_malloc_thresholds(threshold: int) -> bool:
    environment = os.environ
    if environment.get("LIGHTCLIP_NO_MALLOPT", "0") not in ("", "0"):
        return False
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in environment) \
            or "glibc.malloc." in environment.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # no glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold) and mallopt(_M_TRIM_THRESHOLD, threshold))


class LightClipFrozenBatchNorm2d(nn.Module):
    """`nn.BatchNorm2d` with its scale, shift and statistics fixed, as torchvision's and timm's `FrozenBatchNorm2d`.

    All four are buffers: no gradient reaches them, an optimiser does not see them, and a training-mode forward
    normalises with the running statistics and leaves them as they are. The state dict has BatchNorm's keys and values
    (`num_batches_tracked` included, never advanced), so a model with frozen groups saves a checkpoint that loads into
    a fresh `LightClipModel`, and BatchNorm weights load into it. `fuse_conv_bn` folds it as it folds BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batch_norm(cls, norm: nn.BatchNorm2d) -> "LightClipFrozenBatchNorm2d":
        """A frozen copy of `norm`'s state (same tensors' values, devices and dtypes)."""
        if not (norm.affine and norm.track_running_stats):
            raise ValueError(f"only a BatchNorm with affine parameters and running statistics freezes, got {norm}")
        frozen = cls(norm.num_features, norm.eps)
        for name, tensor in norm.state_dict().items():
            setattr(frozen, name, tensor.clone())
        return frozen

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(hidden_states, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` in `module` by a `LightClipFrozenBatchNorm2d` of its state, in place, and
    return `module` (its frozen copy if `module` is itself a BatchNorm), as timm's `freeze_batch_norm_2d`."""
    if isinstance(module, nn.BatchNorm2d):
        return LightClipFrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        frozen = freeze_batch_norm_2d(child)
        if frozen is not child:
            setattr(module, name, frozen)
    return module


def pad_into_conv(conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> nn.Conv2d:
    """One plain `nn.Conv2d` equal to zero padding `pads` (left, right, top, bottom) followed by `conv`.

    Per dimension the new conv pads both sides by the larger amount and its kernel gains zero taps on the smaller side,
    so a stride-2 "SAME" pad of (0, 1) becomes padding 1 and a 4x4 kernel whose first row and column are zero. In
    eager PyTorch the pad copies the whole feature map: pad and 3x3 depthwise conv took about 5x the time of the
    widened conv alone (channels_last, 96 x 112 x 112 maps, batch 16, one thread), whose extra taps cost little."""
    if conv.dilation != (1, 1) or isinstance(conv.padding, str) and conv.padding != "valid":
        raise ValueError(f"pad_into_conv needs an undilated convolution with numeric padding, got {conv}")
    own = (0, 0) if isinstance(conv.padding, str) else conv.padding
    left, right, top, bottom = pads[0] + own[1], pads[1] + own[1], pads[2] + own[0], pads[3] + own[0]
    pad_h, pad_w = max(top, bottom), max(left, right)
    weight = F.pad(conv.weight, (pad_w - left, pad_w - right, pad_h - top, pad_h - bottom))
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(weight.shape[-2:]), conv.stride, (pad_h, pad_w),
                       groups=conv.groups, bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    folded.weight.copy_(weight)
    if conv.bias is not None:
        folded.bias.copy_(conv.bias)
    return folded.train(conv.training)


# activations that may overwrite their input once the BatchNorm before them is folded away: they then own the
# convolution's fresh output, and an in-place activation saves allocating (and page-faulting) one more feature map
_INPLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)
_BATCH_NORMS = (nn.BatchNorm2d, LightClipFrozenBatchNorm2d)


def fuse_conv_bn(module: nn.Module) -> int:
    """Fold every `nn.BatchNorm2d` or `LightClipFrozenBatchNorm2d` that directly follows an `nn.Conv2d` among the
    children of a module into that convolution (eval-mode statistics, `torch.nn.utils.fusion.fuse_conv_bn_eval`) and
    replace it by `nn.Identity`; the activation right after such a pair runs in place from then on. Returns the number
    of pairs folded.

    Pairs are found by registration order, which is call order (conv, norm, activation) in each block of the four CNN
    towers; `tests/test_fuse.py` checks every tower's outputs against the unfused model."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for index, ((conv_name, conv), (norm_name, norm)) in enumerate(zip(children, children[1:])):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, _BATCH_NORMS) \
                    and norm.num_features == conv.out_channels:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
                following = children[index + 2][1] if index + 2 < len(children) else None
                if isinstance(following, _INPLACE_ACTIVATIONS):
                    following.inplace = True
                folded += 1
    return folded


