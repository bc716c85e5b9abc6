"""moesif_fast: Moesif API analytics for Django, built for multi-process servers."""

__version__ = "0.1.0"
