"""The README's layout table names every module of the library and of the shipped model files."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    for folder in ("titans_distil", "models"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{folder}/` |"))
        named = set(re.findall(r"`([\w.]+\.py)`", row))
        modules = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert modules - named == set(), f"README's {folder}/ row does not name {sorted(modules - named)}"
        assert named - modules == set(), (
            f"README's {folder}/ row names missing files {sorted(named - modules)}"
        )
