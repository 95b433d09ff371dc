"""A demo tool that also writes down which environment variables its process sees.

``lookup_order`` behaves as the demo's, and records the names (not values) of
the variables in ``$CORRAL_HOME/env-seen.json``, for tests/test_secrets.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from corral.demo import tools


def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by its number: status, total, customer email, delivery estimate."""
    path = Path(os.environ.get("CORRAL_HOME") or ".corral") / "env-seen.json"
    path.write_text(json.dumps(sorted(os.environ)))
    return tools.lookup_order(order_id)
