"""The package version, in a module of its own (as timm's ``version.py``): exports and run records read it without
importing the package root, which imports everything."""
__version__ = "0.1.0"
