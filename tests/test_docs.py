"""The method is documented inside the repository, and every citation of it resolves."""

import re
import subprocess

from .conftest import REPO

METHOD = REPO / "docs" / "method.md"
EXTERNAL = "METHOD" + ".md"  # the summary the project was started from; users do not have it


def repository_files() -> list:
    """Tracked and untracked-but-not-ignored files (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / name for name in out.splitlines() if (REPO / name).is_file()]


def headings() -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^## (.+)$", METHOD.read_text(), re.M)}


def test_method_document_exists_with_its_sections():
    expected = {"Training objective", "The tanh logit layer", "Models", "Training recipe",
                "Evaluation protocol", "Lipschitz estimates", "Guarantees",
                "Lipschitz constant of a data set", "What the study reports"}
    assert expected <= headings()


def test_no_file_refers_to_a_method_summary_outside_the_repository():
    files = repository_files()
    assert METHOD in files and REPO / "README.md" in files
    offending = [str(p.relative_to(REPO)) for p in files
                 if p.suffix in (".py", ".md", ".yaml", ".toml", ".txt", "")
                 and EXTERNAL in p.read_text(errors="ignore")]
    assert offending == []


def test_every_cited_section_exists():
    """``docs/method.md, "Section"`` in code, configs and docs names a real heading."""
    sections = headings()
    cited = {}
    for path in repository_files():
        if path.suffix in (".py", ".md", ".yaml") and path.name != "test_docs.py":
            for m in re.finditer(r'docs/method\.md,\s*"([^"]+)"', path.read_text(errors="ignore")):
                section = " ".join(m.group(1).replace("#", " ").split())  # across comment lines
                cited.setdefault(section, []).append(str(path.relative_to(REPO)))
    assert cited, "no citation found: the pattern is wrong"
    assert {s: where for s, where in cited.items() if s not in sections} == {}
