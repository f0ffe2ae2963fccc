"""Jinja2 config templates and the thin Triton `model.py` adapters that `builder render` copies into a repository.

A package only so that a wheel installs them (as package data) beside `builder`; nothing here is imported for code.
"""
