"""Data code shared by the recipes (GLUE readers, extra inputs, augmentations and metrics; books as token windows,
QuALITY/RACE readers, the offline SmolLM2).

Kept out of `had_hf`: the method package does not import task data code.
"""
