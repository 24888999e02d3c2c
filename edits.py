"""Deprecated: moved to ``concept_edit.core.plan``. This alias stays for one release (0.2)."""
import warnings

from .core.plan import *  # noqa: F401,F403

warnings.warn("concept_edit.edits is deprecated; import from concept_edit.core.plan", DeprecationWarning, stacklevel=2)
