"""refpg: a reference PaliGemma. A readable NumPy forward pass defines ground truth for every layer."""

from refpg.config import PaliGemmaConfig, load_config

__all__ = ["PaliGemmaConfig", "load_config"]
__version__ = "0.1.0"
