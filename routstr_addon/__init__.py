"""Routstr as a mitmproxy addon: a pay-per-request proxy for OpenAI-compatible APIs."""

__version__ = "0.1.0"
