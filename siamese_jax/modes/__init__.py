"""Whole-workdir modes: each reads a trained workdir, writes its results there, and is what one
`launch.py --mode` calls."""
