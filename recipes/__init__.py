"""Offline recipes that made what the package ships (the default pipeline, the toy evaluators' weights): run once
with ``python -m recipes.<name>`` from the repository root; the package never imports them."""
