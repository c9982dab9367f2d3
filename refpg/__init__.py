"""refpg: a reference PaliGemma. A readable NumPy forward pass defines ground truth for every layer."""

import os

from refpg.config import PaliGemmaConfig, load_config
from refpg.model import PaliGemma
from refpg.processor import Processor

__all__ = ["DEMO_MODEL", "PaliGemma", "PaliGemmaConfig", "Processor", "load_config"]
__version__ = "0.1.0"

# The tiny trained PaliGemma shipped inside the package (tools/train_demo.py writes it; `refpg demo`).
DEMO_MODEL = os.path.join(os.path.dirname(__file__), "data", "demo")
