"""refpg: a reference PaliGemma. A readable NumPy forward pass defines ground truth for every layer."""

from refpg.config import PaliGemmaConfig, load_config
from refpg.model import PaliGemma
from refpg.processor import Processor

__all__ = ["PaliGemma", "PaliGemmaConfig", "Processor", "load_config"]
__version__ = "0.1.0"
