"""The site workbench: a local web app to pick the L3 range in a whole CT series, segment it
and correct the labels, next to the private data (``sarcofed site workbench``)."""
