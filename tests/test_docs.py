"""What the documents and the code's comments name exists: repository paths, links between the documents, test
modules, and dotted names of the project's modules (``refine.core.write.atomic_path``, ``distill.kd.Distiller``).

Dotted names are resolved statically (the modules' files and their syntax trees, nothing imported), so the check
runs in the unit tier and never starts vLLM or torch."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("refine", "distill", "bench", "tools")
CODE_DIRS = ("refine", "distill", "bench", "tools", "tests")
# The user documents: the README, the pages under docs/ and the benchmarks' README.
DOCS = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")])

# repository paths under the project's folders and top-level documents (all-capitals names ending in .md)
REF = re.compile(r"(?<![\w/.])((?:bench|tests|refine|distill|conf|tools|reports|docs)/[\w./-]*\w"
                 r"\.(?:py|md|yaml|json|png|sh)|[A-Z]+\.md)")
# files the documents name as what a command writes, not as files of the repository
WRITTEN_BY_COMMANDS = {"reports/demo.md", "bench/results/gpu_check.json"}
# a dotted name of the project's code: a package, then identifiers (not a file name such as tools.py)
DOTTED = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+)(?![\w/-]|\.\w)")
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "jsonl", "png", "sh", "txt", "log", "toml", "npz", "npy"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TEST_MODULE = re.compile(r"(?<![\w/.])(test_[a-z0-9_]+)(?![\w.(])")

# Dotted names in code comments that no longer resolve, left for the owners of those files (file, name).
KNOWN_STALE_IN_CODE: set[tuple[str, str]] = set()


def _code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))


def test_files_named_in_the_code_exist():
    missing = []
    for f in (f for f in _code_files() if f.name != "test_docs.py"):
        for ref in REF.findall(f.read_text()):
            if not (REPO / ref).exists() and not (f.parent / ref).exists():
                missing.append(f"{f.relative_to(REPO)} names {ref}")
    assert not missing, missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_files_named_in_the_documents_exist(doc):
    missing = [ref for ref in REF.findall(doc.read_text())
               if ref not in WRITTEN_BY_COMMANDS and not (REPO / ref).exists() and not (doc.parent / ref).exists()]
    assert not missing, f"{doc.relative_to(REPO)} names {missing}"


USER_DOCS = [d for d in DOCS if d.parent.name != "bench"]     # bench/README.md records runs: dates, commits
HOUSE_RULES = [(re.compile(r"\bissues? #?\d+", re.I), "an issue number"),
               (re.compile(r"\b20\d\d-[01]\d\b"), "a date")]


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_user_documents_keep_the_house_rules(doc):
    """No issue numbers or dates (the documents say what is, not its history); table rows a reader can read."""
    broken = [f"line {i}: {what}" for i, line in enumerate(doc.read_text().splitlines(), 1)
              for rule, what in HOUSE_RULES if rule.search(line)]
    broken += [f"line {i}: a table row of {len(line)} characters" for i, line in
               enumerate(doc.read_text().splitlines(), 1) if line.startswith("|") and len(line) > 200]
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


def test_the_readme_is_read_in_ten_minutes():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", doc.read_text(), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_between_the_documents_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue                                   # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO)} links to {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, unlinked


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_test_modules_named_in_the_documents_exist(doc):
    tests = {p.stem for p in (REPO / "tests").rglob("test_*.py")}
    missing = sorted({m for m in TEST_MODULE.findall(doc.read_text()) if m not in tests})
    assert not missing, f"{doc.relative_to(REPO)} names {missing}"


# --- dotted names --------------------------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


@cache
def _tree(f: Path) -> ast.Module:
    return ast.parse(f.read_text(), str(f))


def _bound_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body binds at its top level (through if/try blocks too)."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names[(a.asname or a.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                names.update(_bound_names(getattr(node, block, [])))
            for h in getattr(node, "handlers", []):
                names.update(_bound_names(h.body))
    return names


def _instance_attributes(cls: ast.ClassDef) -> set[str]:
    return {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self" and isinstance(getattr(n, "ctx", None), ast.Store)}


def _resolve_in_module(module: str, attrs: list[str], depth: int = 0) -> bool:
    if not attrs:
        return True
    if depth > 10:
        return False
    f = _module_file(module)
    if f is None:
        return False
    if f.name == "__init__.py" and _module_file(f"{module}.{attrs[0]}"):
        return _resolve_in_module(f"{module}.{attrs[0]}", attrs[1:], depth + 1)
    node = _bound_names(_tree(f).body).get(attrs[0])
    if node is None:
        return False
    if isinstance(node, (ast.Import, ast.ImportFrom)) and f.name != "__init__.py":
        return False                                    # a name a module imports lives where it is defined
    if isinstance(node, ast.ImportFrom):
        source = node.module or ""
        if node.level:
            parts = module.split(".")[: len(module.split(".")) - node.level + (f.name == "__init__.py")]
            source = ".".join(parts + ([node.module] if node.module else []))
        alias = next(a for a in node.names if (a.asname or a.name) == attrs[0])
        if source.split(".")[0] not in PACKAGES:
            return True                                 # a name from another library: not ours to check
        if _module_file(f"{source}.{alias.name}"):
            return _resolve_in_module(f"{source}.{alias.name}", attrs[1:], depth + 1)
        return _resolve_in_module(source, [alias.name, *attrs[1:]], depth + 1)
    if isinstance(node, ast.Import):
        return True
    if isinstance(node, ast.ClassDef) and len(attrs) > 1:
        members = _bound_names(node.body)
        return attrs[1] in members or attrs[1] in _instance_attributes(node)
    return True                                         # a function, a constant: deeper parts are its values'


def resolves(name: str) -> bool:
    """``name`` is a module of the repository, or a module then attributes it defines (``a.b.C.method``); a name
    a module only imports resolves through the package that re-exports it (``__init__.py``) or its own module."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:i])):
            return _resolve_in_module(".".join(parts[:i]), parts[i:])
    return False


def dotted_names(text: str) -> set[str]:
    return {n for n in DOTTED.findall(text) if n.rsplit(".", 1)[1] not in FILE_SUFFIXES}


def _comments_and_docstrings(f: Path) -> str:
    """The text of a module's comments and docstrings, where prose names code (the code itself is checked by
    importing it)."""
    source = f.read_text()
    parts = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(_tree(f)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def test_the_resolver_tells_real_names_from_stale_ones():
    for real in ("refine.core.write.atomic_path", "distill.kd.Distiller", "refine.core.logits.LogitsStore",
                 "refine.core.forward.forward_logits", "distill.kd", "refine.fetch.registry.PINNED"):
        assert resolves(real), real
    for stale in ("refine.scorers.hf.forward_logits", "distill.kd.NoSuchThing", "refine.no_module",
                  "refine.core.write.FolderLock.no_method"):
        assert not resolves(stale), stale
    assert dotted_names("see refine.core.write, conf/refine.yaml, tools.py and `distill.kd.Distiller`.") == {
        "refine.core.write", "distill.kd.Distiller"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_dotted_names_in_the_documents_resolve(doc):
    stale = sorted(n for n in dotted_names(doc.read_text()) if not resolves(n))
    assert not stale, f"{doc.relative_to(REPO)} names {stale}"


def test_dotted_names_in_the_code_comments_resolve():
    stale = sorted((str(f.relative_to(REPO)), n) for f in _code_files() if f.name != "test_docs.py"
                   for n in dotted_names(_comments_and_docstrings(f)) if not resolves(n))
    new = [s for s in stale if s not in KNOWN_STALE_IN_CODE]
    assert not new, new
