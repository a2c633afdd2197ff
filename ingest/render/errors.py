"""Errors of the rendering package."""

from __future__ import annotations


class RenderError(RuntimeError):
    """Nothing could be rendered (a whole study, or one file asked for explicitly)."""


class UnreadableInstance(RenderError):
    """One file cannot be rendered; the message is the reason, safe to log (no PHI)."""
