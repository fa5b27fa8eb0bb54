"""The documentation stays true: the configuration reference is the schema's, and the README links
every page."""
from pathlib import Path

from fastsim.config_reference import config_reference

ROOT = Path(__file__).parent.parent


def test_configuration_reference_is_generated_from_the_schema():
    """Regenerate with `fastsim config-reference -o docs/configuration.md` after changing the schema."""
    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference()


def test_reference_covers_every_engine_argument():
    from fastsim.config import Engine

    text = config_reference()
    assert all(f"| `{name}` |" in text for name in Engine.model_fields)


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name
