"""Every "Explained in notebook N, section K" pointer in the package leads to a section that exists and,
for a function or class, to a section that uses it (so the pointers cannot silently go stale)."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POINTER = re.compile(r'[Ee]xplained in notebook (\d\d)\w*(?:,? (?:section )?(\d+[a-z]?|"[^"]+"))?')


def _sections(number: str) -> dict:
    """Heading text -> the text of its cells (markdown and code), for notebook ``number``."""
    path = next((ROOT / "notebooks").glob(f"{number}_*.ipynb"), None)
    assert path is not None, f"no notebook {number}"
    sections, current = {"": ""}, ""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        text = "".join(cell["source"])
        for line in text.splitlines():
            if cell["cell_type"] == "markdown" and line.startswith("## "):
                current = line[3:].strip()
                sections[current] = ""
        sections[current] += text + "\n"
    return sections


def _pointers():
    for path in sorted((ROOT / "peft_lab").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node) or ""
                for match in POINTER.finditer(doc):
                    name = getattr(node, "name", None)
                    yield pytest.param(path.name, name, match.group(1), match.group(2),
                                       id=f"{path.relative_to(ROOT)}:{name or 'module'}")


@pytest.mark.parametrize("module, name, notebook, section", list(_pointers()))
def test_pointer_leads_to_a_section_that_uses_it(module, name, notebook, section):
    sections = _sections(notebook)
    if section is None:
        return  # "Explained in notebook 02_lora." points at the whole notebook
    if section.startswith('"'):
        title = section.strip('"').lower()
        found = [h for h in sections if title in h.lower()]
    else:
        found = [h for h in sections if h.startswith(f"{section}. ") or h.startswith(f"{section} ")]
    assert found, f"{module}: notebook {notebook} has no section {section} (headings: {[h for h in sections if h]})"
    if name and not name.startswith("_"):
        text = "".join(sections[h] for h in found)
        assert re.search(rf"\b{re.escape(name)}\b", text), (
            f"{module}:{name} says it is explained in notebook {notebook}, section {section}, "
            f"but that section never mentions {name}")
