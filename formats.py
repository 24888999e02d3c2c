"""Deprecated: moved to ``concept_edit.files.formats``. This alias stays for one release (0.2)."""
import warnings

from .files.formats import *  # noqa: F401,F403

warnings.warn("concept_edit.formats is deprecated; import from concept_edit.files.formats", DeprecationWarning, stacklevel=2)
