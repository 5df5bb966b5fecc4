"""Stage 3: read roles (attention projections, FFN, residuals, norms, ...) and layers off the traced graph."""
from surgery.analyze.roles import Analysis, LinearInfo, Site, analyze

__all__ = ["Analysis", "LinearInfo", "Site", "analyze"]
