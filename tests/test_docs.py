"""Every file a docstring or comment of the code names exists (issue 16: references that pointed nowhere)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# repository paths under the project's folders and top-level documents (all-capitals names ending in .md)
REF = re.compile(r"(?<![\w/.])((?:bench|tests|refine|distill|conf|tools|reports)/[\w./-]*\w\.(?:py|md|yaml|json|png)"
                 r"|[A-Z]+\.md)")


def test_files_named_in_the_code_exist():
    missing = []
    files = sorted(p for d in ("refine", "distill", "bench", "tools", "tests") for p in (REPO / d).rglob("*.py"))
    for f in (f for f in files if f.name != "test_docs.py"):
        for ref in REF.findall(f.read_text()):
            if not (REPO / ref).exists() and not (f.parent / ref).exists():
                missing.append(f"{f.relative_to(REPO)} names {ref}")
    assert not missing, missing
