"""The method is documented inside the repository, and every citation of it resolves."""

import re
import subprocess

from ..helpers import REPO

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


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
CODE_LINK = re.compile(r"\b(docs/[\w/.-]+\.md)#([\w-]+)")  # docs/page.md#anchor in code


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than ``-`` and ``_``
    dropped (backticks, colons, apostrophes, dots, slashes), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    """The anchors of a Markdown page's headings (not of ``#`` lines in code blocks); a
    repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)$", line)):
            slug = github_slug(m.group(1))
            out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_github_slugs_of_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# The model's bound\n## Cost: `benchmarks/eval.py`\n```bash\n# not one\n"
                    "```\n## Cost: `benchmarks/eval.py`\n### J2-Lip2 & tanh_head\n")
    assert anchors(page) == {"the-models-bound", "cost-benchmarksevalpy",
                             "cost-benchmarksevalpy-1", "j2-lip2--tanh_head"}


def broken_link(target: str, base) -> str | None:
    """Why a relative link ``target`` from a file in folder ``base`` does not resolve (None:
    it does, or it is external)."""
    if re.match(r"[a-z]+:", target):  # https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    page = (base / path).resolve() if path else None
    if page is not None and not page.exists():
        return "no such file"
    if anchor and page is not None and page.suffix == ".md" and anchor not in anchors(page):
        return f"no heading #{anchor}"
    return None


def test_every_link_of_the_documentation_resolves():
    """Each relative link of README.md, CHANGELOG.md, docs/ and benchmarks/README.md names
    an existing file, and its #anchor a heading of that page; so does each
    ``docs/page.md#anchor`` that the code prints."""
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "benchmarks" / "README.md",
             *sorted((REPO / "docs").glob("*.md"))]
    broken, links = {}, 0
    for page in pages:
        text, fenced_free = page.read_text(), []
        for block, chunk in enumerate(text.split("```")):
            if block % 2 == 0:  # outside code blocks
                fenced_free.append(chunk)
        for target in LINK.findall("".join(fenced_free)):
            links += 1
            if (why := broken_link(target, page.parent)) is not None:
                broken[f"{page.relative_to(REPO)}: {target}"] = why
    for path in sorted((REPO / "lipexp").rglob("*.py")):
        for m in CODE_LINK.finditer(path.read_text()):
            links += 1
            if (why := broken_link(f"{m.group(1)}#{m.group(2)}", REPO)) is not None:
                broken[f"{path.relative_to(REPO)}: {m.group(0)}"] = why
    assert links > 20, "no links found: the patterns are wrong"
    assert broken == {}


def test_every_evaluation_warning_ends_with_a_link_to_its_section():
    """Each self-check's warning (each check triggered on hand-made inputs) ends with
    ``(see docs/evaluation.md#anchor)``, the anchor a heading of that page, one per check."""
    import numpy as np
    import torch

    from lipexp.attacks.distance import FMNAttack, PGDSearch
    from lipexp.evaluation.certification import violation_warnings
    from lipexp.evaluation.checks import (
        attack_beats_reference_median,
        vanishing_gradients,
        weak_attack_beats_reference,
    )

    reference, weak = PGDSearch("l2", steps=20), PGDSearch("l2", steps=1, targets=0)
    ref_d = np.array([0.0, 0.5, 1.0, 2.0, np.inf], dtype=np.float32)
    smaller = np.array([0.0, 0.1, 0.2, 0.3, np.inf], dtype=np.float32)
    grads = {"grad_loss_l2": torch.tensor([0.0, 0.0, 1.0, 1.0])}  # half of them vanish
    warnings = [
        *vanishing_gradients(grads, torch.zeros(4, dtype=torch.bool)),
        *weak_attack_beats_reference({"l2_pgd": reference, "l2_gradient": weak},
                                     {"l2_pgd": ref_d, "l2_gradient": smaller}),
        *attack_beats_reference_median({"l2_pgd": reference, "l2_fmn": FMNAttack("l2")},
                                       {"l2_pgd": ref_d, "l2_fmn": smaller}),
        *violation_warnings({"certified": {"l2": {"violations": 3,
                                                  "reference_attack": "l2_pgd"}}}),
    ]
    assert len(warnings) == 4
    page = REPO / "docs" / "evaluation.md"
    sections = anchors(page)
    linked = []
    for warning in warnings:
        m = re.search(r"\(see docs/evaluation\.md#([\w-]+)\)$", warning)
        assert m, warning
        assert m.group(1) in sections, (m.group(1), sorted(sections))
        linked.append(m.group(1))
    assert len(set(linked)) == 4, linked  # each check its own section
