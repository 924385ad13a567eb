"""README's "common problems" table promises a test per row: every test it names must exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("readme", ["README.md", "README_en.md"])
def test_every_test_named_in_the_problems_table_exists(readme):
    text = (ROOT / readme).read_text(encoding="utf-8")
    refs = re.findall(r"`(test_[a-z0-9_]+\.py)(?:::(test_[a-z0-9_]+))?`", text)
    assert len(refs) >= 15, f"{readme}: the common-problems table names too few tests"
    for path, name in refs:
        test_file = ROOT / "tests" / path
        assert test_file.is_file(), f"{readme} names {path}, which does not exist"
        if name:
            assert re.search(rf"^def {name}\(", test_file.read_text(encoding="utf-8"), re.M), \
                f"{readme} names {path}::{name}, which does not exist"
