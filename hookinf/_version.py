"""hookinf's version, in a module of its own so that parts of the package can name it without importing the package."""

__version__ = "0.1.0"
