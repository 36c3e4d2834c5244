"""Analyses of a model that guide a technique's settings (``suite analyze ...``); see each module."""
