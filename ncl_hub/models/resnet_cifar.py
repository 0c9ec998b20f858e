"""CIFAR ResNets (He et al. 2016, section 4.2) registered as ordinary timm models.

Three stages of ``n`` basic blocks with 16/32/64 channels, a 3x3 stem with no pooling and
option-A shortcuts (strided identity, zero-padded channels), as in the long-tailed CIFAR
literature (Cao et al. 2019; Cui et al. 2019) that NCL follows. ``resnet32_cifar`` has
5 blocks per stage and a 64-d feature.

Depth = 6n + 2: ``resnet20_cifar`` (n=3), ``resnet32_cifar`` (5), ``resnet44_cifar`` (7),
``resnet56_cifar`` (9), ``resnet110_cifar`` (18). ``resnet8_cifar_tiny`` (n=1, 8/16/32
channels) exists for fast tests.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from .normalization import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["CifarResNet"]


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels. No parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))


class BasicBlockA(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = ShortcutA(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with the timm model interface.

    Args:
        layers: blocks per stage (three stages).
        widths: channels per stage.
        num_classes: classifier outputs; 0 gives pooled features from ``forward``.
        in_chans: input channels.
        global_pool: timm pooling type for the head.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        layers: Sequence[int] = (5, 5, 5),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_chs = widths[0]
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="bn1")]
        for i, (n, w) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlockA(in_chs if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_chs = w
            self.feature_info.append(dict(num_chs=w, reduction=2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal convs and linears, as in the CIFAR-LT reference implementations.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|^bn1", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D, H/4, W/4] feature map."""
        x = F.relu(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled [B, D] (``pre_logits``) or logits [B, num_classes]."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    feature_cfg = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "conv1", "classifier": "head.fc", "license": "apache-2.0",
        "paper_ids": "arXiv:1512.03385", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resnet8_cifar_tiny": _cfg(),
    "resnet20_cifar": _cfg(),
    "resnet32_cifar": _cfg(),
    "resnet44_cifar": _cfg(),
    "resnet56_cifar": _cfg(),
    "resnet110_cifar": _cfg(),
})


@register_model
def resnet8_cifar_tiny(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Tiny 8-layer CIFAR ResNet (8/16/32 channels) for tests."""
    return _create("resnet8_cifar_tiny", pretrained, **dict(dict(layers=(1, 1, 1), widths=(8, 16, 32)), **kwargs))


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3 x 3 basic blocks)."""
    return _create("resnet20_cifar", pretrained, **dict(dict(layers=(3, 3, 3)), **kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (3 x 5 basic blocks, 64-d feature), the NCL CIFAR-LT backbone."""
    return _create("resnet32_cifar", pretrained, **dict(dict(layers=(5, 5, 5)), **kwargs))


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (3 x 7 basic blocks)."""
    return _create("resnet44_cifar", pretrained, **dict(dict(layers=(7, 7, 7)), **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (3 x 9 basic blocks)."""
    return _create("resnet56_cifar", pretrained, **dict(dict(layers=(9, 9, 9)), **kwargs))


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (3 x 18 basic blocks)."""
    return _create("resnet110_cifar", pretrained, **dict(dict(layers=(18, 18, 18)), **kwargs))
