"""The package's version: its one source (setup.py reads it)."""
__version__ = '0.2.0'
