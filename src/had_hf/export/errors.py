"""The error of a HAD export that cannot proceed."""


class HADExportError(ValueError):
    """The export cannot proceed: the model is not a calibrated HAD model, or an argument or OUTPUT_DIR is bad."""
