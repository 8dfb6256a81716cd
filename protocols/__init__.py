"""Schemas and names shared by every part of sarcofed.

Only the standard library and pydantic are imported here: this package is the contract
between a site (``client``), the coordinator (``server``) and the science (``common``).
Message record keys, report field names, class names and bin names are defined once,
here, and nowhere else.
"""
