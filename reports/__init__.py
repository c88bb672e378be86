"""Jinja2 report rendering: reads result files only, writes one self-contained HTML file."""
