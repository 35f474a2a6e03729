"""The error of weights that cannot be loaded (its own module, free of torch: `evaluate --results` names it)."""


class WeightsError(ValueError):
    """Weights that cannot be loaded into the model; the message names the source and the keys."""
