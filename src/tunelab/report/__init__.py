"""Reports: one self-contained HTML page (and Markdown) from run directories."""
