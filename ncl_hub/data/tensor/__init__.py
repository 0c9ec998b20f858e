"""``data.pipeline=tensor``: ``cache`` decodes a split once to a uint8 tensor file keyed by its content,
``augment`` runs the released CIFAR augmentation on whole batches of tensors, ``loaders`` serves the batches from
the device."""
from .cache import DecodedSplit, decode_split, default_cache_dir, fit_transform
from .loaders import TensorEvalLoader, TensorTrainLoader, build_tensor_loaders, check_tensor_pipeline

__all__ = ["DecodedSplit", "TensorEvalLoader", "TensorTrainLoader", "build_tensor_loaders", "check_tensor_pipeline",
           "decode_split", "default_cache_dir", "fit_transform"]
