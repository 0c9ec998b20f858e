"""Hugging Face Hub export and import of NCL models, in timm's Hub layout (:mod:`.layout`).

Once ``ncl_hub`` is imported, ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` and
``timm.create_model('local-dir:PATH', pretrained=True)`` rebuild an exported model with its weights.

* :mod:`.export`: ``save_pretrained`` (the NCL format: ensemble or one expert) and ``export_timm`` (one expert as a
  plain timm model that loads without ncl_hub), both written with timm's ``save_for_hf``;
* :mod:`.card`: the model card, rendered from the package's template;
* :mod:`.load`: ``load_model`` (local folder, Hub repo, registered name, plain-timm export), ``init_from`` and
  ``freeze_trunks`` for fine-tuning;
* :mod:`.publish`: ``publish``, a training run as two Hub repos (ensemble and selected expert).
"""
from ..files import DamagedFileError
from ..models.factory import CheckpointMismatchError, WeightsUnavailableError
from .card import CARD_TAGS, RunRecord, render_model_card
from .export import export_timm, save_pretrained
from .layout import CONFIG_NAME, FORMATS, TRAINING_CONFIG_NAME, VARIANTS, WEIGHTS_NAME
from .load import freeze_trunks, init_from, load_model
from .publish import PublishOptions, publish

__all__ = [
    "save_pretrained", "export_timm", "publish", "load_model", "init_from", "freeze_trunks", "render_model_card",
    "RunRecord", "PublishOptions", "CheckpointMismatchError", "DamagedFileError", "WeightsUnavailableError",
    "CARD_TAGS", "CONFIG_NAME", "FORMATS", "TRAINING_CONFIG_NAME", "VARIANTS", "WEIGHTS_NAME",
]
