"""lowbit's version, in its own module so that any room can read it without importing the package's
top (which imports most rooms)."""
__version__ = "0.1.0"
