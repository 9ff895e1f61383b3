"""cpt-ds: DeepSpeed-native continued pretraining for LLaMA-3 models."""

__version__ = "0.1.0"
