"""Suite-wide settings.

Spawned gloo workers inherit ``MAPGEN_DIST_TIMEOUT``: a desynchronised collective fails the test after two
minutes instead of hanging CI for torch's default thirty.
"""

from __future__ import annotations

import os

os.environ.setdefault("MAPGEN_DIST_TIMEOUT", "120")
