"""Frozen backbones and offline pretrained-weight converters."""
