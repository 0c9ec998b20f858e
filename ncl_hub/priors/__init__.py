"""Class priors: ``adjustment`` (checking priors, the long-tailed test priors, logit adjustment, prior files) and
``estimation`` (the prior of unlabelled images estimated by EM, its shrinkage chosen on validation data)."""
from .adjustment import (
    PRIOR_NAMES, TEST_IMBALANCES, PriorSpec, check_prior, check_prior_strength, describe_prior, format_imbalance,
    load_prior_file, logit_adjustment, long_tailed_prior, resolve_prior, training_order,
)
from .estimation import (
    SHRINKAGE_CANDIDATES, PriorEstimate, check_labelled_logits, check_logits, estimate_prior, select_shrinkage,
)

__all__ = [
    "PRIOR_NAMES", "TEST_IMBALANCES", "PriorSpec", "check_prior", "check_prior_strength", "describe_prior",
    "format_imbalance", "load_prior_file", "logit_adjustment", "long_tailed_prior", "resolve_prior", "training_order",
    "SHRINKAGE_CANDIDATES", "PriorEstimate", "check_labelled_logits", "check_logits", "estimate_prior",
    "select_shrinkage",
]
