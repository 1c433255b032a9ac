"""Ratios files are read and written by jaxdiff (``jaxdiff.schedule_files``); re-exported."""

from jaxdiff.schedule_files import FORMAT, VERSION, load_ratios, save_ratios

__all__ = ["FORMAT", "VERSION", "load_ratios", "save_ratios"]
