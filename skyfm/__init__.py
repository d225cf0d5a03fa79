"""skyfm: a foundation model for finding astrophysical sources in sky images across wavelengths."""

__version__ = "0.1.0"
