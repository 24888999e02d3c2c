"""Deprecated: moved to ``concept_edit.engines``. This alias stays for one release (0.2)."""
import warnings

from .engines import *  # noqa: F401,F403

warnings.warn("concept_edit.methods is deprecated; import from concept_edit.engines", DeprecationWarning, stacklevel=2)
