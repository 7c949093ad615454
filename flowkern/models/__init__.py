"""Ready-made flows."""
from .glow import Glow
from .realnvp import RealNVP

__all__ = ["Glow", "RealNVP"]
