"""Why a project cannot be predicted, in words that name the setting to change.

Annotations that could not become prompts are recorded per project (``PromptStore.problems``);
these helpers turn those records into the one-line reason a prediction carries and the
short fix Label Studio shows when ``/setup`` is refused.
"""
from __future__ import annotations

import re

BACKFILL_PROBLEM = "backfill"  # the record of a failed read of the project's annotations from Label Studio

# The first setting a reason names decides the fix; the order puts the usual first cause first.
_FIXES = (
    ("LABEL_STUDIO_URL is not set", "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend, then restart it"),
    ("LABEL_STUDIO_API_KEY", "set LABEL_STUDIO_API_KEY to a valid personal access token, then restart the backend"),
    ("ALLOWED_MEDIA_HOSTS", "add the image host to ALLOWED_MEDIA_HOSTS, then restart the backend"),
    ("LOCAL_FILES", "check LOCAL_FILES_DOCUMENT_ROOT and Label Studio's local storage for the images"),
    ("LABEL_STUDIO_URL", "check LABEL_STUDIO_URL: the backend must reach Label Studio there"),
    ("MEDIA_TIMEOUT", "check that the backend reaches the images, or raise MEDIA_TIMEOUT"),
    ("MAX_IMAGE_", "raise MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS, or use smaller images"),
)
_GENERIC_FIX = "see the reason in Settings > Model > Send Test Request, or in the backend's log"


def describe(problems: list[dict]) -> str | None:
    """One line for the newest problem and how many there are; None without problems."""
    if not problems:
        return None
    newest = problems[-1]
    if newest["key"] == BACKFILL_PROBLEM:
        return f"the project's annotations could not be read from Label Studio: {newest['reason']}"
    count = sum(p["key"] != BACKFILL_PROBLEM for p in problems)
    what = "an annotation" if count == 1 else f"{count} annotations"
    task = f"task {newest['task']}: " if newest.get("task") is not None else ""
    return f"{what} could not become prompts ({task}{newest['reason']})"


def fix_for(reason: str) -> str:
    """The short instruction for the setting a reason names."""
    return next((fix for needle, fix in _FIXES if needle in reason), _GENERIC_FIX)


def slug(text: str, limit: int = 160) -> str:
    """``text`` as one URL path segment that still reads as words (Label Studio shows URLs, not bodies)."""
    words = re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-")
    return words[:limit].rstrip("-") or "refused"
