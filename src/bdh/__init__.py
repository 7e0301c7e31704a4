"""BDH (Baby Dragon Hatchling): the BDH-GPU language model and its equivalent forms."""

from bdh.config import BDHConfig, ConfigError

__all__ = ["BDHConfig", "ConfigError"]
__version__ = "0.1.0"
