"""The column and split names the data layer recognises: a leaf module, so that every reader of datasets (loading,
benchmarks, evaluation) shares one list."""
__all__ = ["IMAGE_COLUMNS", "LABEL_COLUMNS", "VALIDATION_SPLITS"]

# Column names tried, in order, when image_column / label_column are not given (CIFAR-100 on the Hub has `img` and
# `fine_label`).
IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "fine_label")
# A split with one of these names is the validation split: a source's own is returned as "val" (model selection
# uses it), and evaluation reports it as validation.
VALIDATION_SPLITS = ("validation", "val", "valid")
