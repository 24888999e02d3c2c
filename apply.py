"""Deprecated: moved to ``concept_edit.core.apply``. This alias stays for one release (0.2)."""
import warnings

from .core.apply import *  # noqa: F401,F403

warnings.warn("concept_edit.apply is deprecated; import from concept_edit.core.apply", DeprecationWarning, stacklevel=2)
