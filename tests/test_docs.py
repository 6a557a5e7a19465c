"""Every public name has an entry in the API pages (docs/api/*.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import softtopk

API = Path(__file__).resolve().parents[1] / "docs" / "api"


@pytest.mark.parametrize("name", [n for n in softtopk.__all__ if n != "__version__"])
def test_public_name_is_documented(name):
    text = "\n".join(page.read_text() for page in sorted(API.glob("*.md")))
    # An autodoc directive or a reference naming softtopk[.module].name.
    found = re.search(rf"softtopk\.(\w+\.)*{re.escape(name)}\b", text)
    assert found, f"softtopk.{name} has no entry in docs/api"
