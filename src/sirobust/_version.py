"""The version of sirobust, in one place below every module that records it (pyproject.toml repeats it for the build)."""
__version__ = "0.1.0"
