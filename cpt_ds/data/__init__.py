"""What training reads: token streams cut into samples (windows), their order (loader), weighted
blends and the run's named corpora. Offline preparation (packing, merging, vocabulary extension)
lives in cpt_ds.pack, which training never imports."""


class DataError(ValueError):
    """The run's data cannot serve this configuration (too few tokens, a data position that no longer
    fits); the message names the field and the fix."""
