"""Exporters: write a compressed model in a format a runtime loads, then prove it loads the same.

Installed as compress.export (see pyproject.toml). Exporters never import stages.
"""
