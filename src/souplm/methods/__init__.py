"""Merge methods, one file each; see `registry.py` for the contract a method declares."""

from .registry import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
