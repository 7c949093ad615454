"""Ready-made flows."""
from .glow import Glow
from .lowdim import MAF, NSF
from .realnvp import RealNVP

__all__ = ["Glow", "MAF", "NSF", "RealNVP"]
