"""The version of hf_sift, in a module of its own so that any submodule can import it without import cycles."""

__version__ = "0.1.0"
