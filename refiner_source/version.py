"""The package's version, in a module of its own so that any part (the web face, the command line)
reads it without importing the package's app factory."""

__version__ = "0.1.0"
