"""BDH (Baby Dragon Hatchling): the BDH-GPU language model and its equivalent forms."""

from bdh.config import BDHConfig, ConfigError
from bdh.model import BDH
from bdh.state import BDHState

__all__ = ["BDH", "BDHConfig", "BDHState", "ConfigError"]
__version__ = "0.1.0"
