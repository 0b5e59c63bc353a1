"""Benchmarks the CLI runs that train models (above train/ and eval/, so that eval/ never imports train/)."""
