"""Reporting: the printed results table, the figures and the HTML page."""
