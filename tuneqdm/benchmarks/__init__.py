"""The fidelity benchmark the CLI runs (it trains: above train/ and eval/, so that eval/ never imports train/) and the
HTML report of its results or of one evaluation."""
