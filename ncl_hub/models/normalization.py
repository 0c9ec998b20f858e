"""Per-channel normalisation statistics (RGB, on [0, 1] pixels) of the CIFAR datasets, as the released NCL code and
its CIFAR-LT ancestors normalise them; the models' ``pretrained_cfg`` carry them, and every transform reads them
from there. ImageNet-scale models use timm's ``IMAGENET_DEFAULT_MEAN`` / ``_STD``."""
__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)  # the value in the released CIFAR-LT code (not the images' own std)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
