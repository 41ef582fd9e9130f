"""Every ```python block of README.md and docs/ runs, as written, in reading order.

Blocks of one file share a namespace, like the cells of a notebook: a block
may use what an earlier block of the same file defined. After each block, the
`test_*` functions it defined are called, so a pytest test shown in the docs
is run too, not only defined. Blocks fenced ```bash (or anything but
```python) are not run.

A block preceded by an HTML comment `<!-- snippet: env NAME=VALUE ... -->`
(invisible in the rendered page) runs on its own, in a fresh Python process
with those environment variables: the scaling-out example needs 8 devices,
which `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives a CPU only
before JAX starts. Such a block must be self-contained (its own imports).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*snippet:\s*(?P<body>.*?)\s*-->\s*$")


def blocks(path: Path) -> list[tuple[int, str, dict[str, str] | None]]:
    """The ```python blocks of `path`: (first line number, code, env for a subprocess run or None)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m["lang"]:
            i += 1
            continue
        indent, lang, start = m["indent"], m["lang"], i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if lang == "python":
            env = None
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            d = _DIRECTIVE.match(lines[k]) if k >= 0 else None
            if d and d["body"].startswith("env"):
                env = dict(item.split("=", 1) for item in d["body"].split()[1:])
            code = "\n".join(line[len(indent):] for line in lines[start:j])
            out.append((start + 1, textwrap.dedent(code), env))
        i = j + 1
    return out


def _run_in_subprocess(path: Path, line: int, code: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode:
        pytest.fail(f"{path.relative_to(ROOT)}:{line}: the block failed in a subprocess with {env}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


WITH_CODE = [p for p in FILES if blocks(p)]
# The pages whose blocks train, shard or run the law kit (10-60 s each on 2 cores): CI runs them (`--run-slow`),
# the README's command the rest, to stay under its 5 minutes.
HEAVY = {"README.md", "docs/guides/train-eval.md", "docs/guides/scaling-out.md", "docs/guides/testing-handlers.md",
         "docs/getting-started.md"}


@pytest.mark.parametrize("path", [
    pytest.param(p, id=str(p.relative_to(ROOT)), marks=pytest.mark.slow if str(p.relative_to(ROOT)) in HEAVY else ())
    for p in WITH_CODE
])
def test_python_blocks_run_in_order(path, tmp_path, monkeypatch):
    found = blocks(path)
    monkeypatch.chdir(tmp_path)  # a block that writes files (a checkpoint) writes them here
    module = types.ModuleType(f"effax_docs_snippets_{path.stem}")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses and pickle look classes up there
    namespace = module.__dict__
    for line, code, env in found:
        if env is not None:
            _run_in_subprocess(path, line, code, env)
            continue
        before = set(namespace)
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
            for name in [n for n in namespace if n not in before and n.startswith("test_")]:
                if callable(namespace[name]):
                    namespace[name]()
        except Exception as e:
            raise AssertionError(f"{path.relative_to(ROOT)}: the block at line {line} failed: "
                                 f"{type(e).__name__}: {e}") from e


def test_the_extractor_finds_blocks_and_directives(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```python\nx = 1\n```\n```bash\nls\n```\n"
        "<!-- snippet: env A=1 B=x=y -->\n\n```python\ny = 2\n```\n"
        "- item:\n\n  ```python\n  z = 3\n  ```\n"
    )
    assert blocks(doc) == [(3, "x = 1", None), (11, "y = 2", {"A": "1", "B": "x=y"}), (16, "z = 3", None)]


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("path", [ROOT / "README.md"], ids=["README.md"])
def test_relative_links_point_to_files(path):
    """The README links into docs/: each relative link names a file that exists (mkdocs checks docs/ itself)."""
    broken = []
    for m in _LINK.finditer(path.read_text(encoding="utf-8")):
        target = m["target"].split("#", 1)[0]
        if target and "://" not in target and not (path.parent / target).exists():
            broken.append(m["target"])
    assert not broken, f"{path.name} links to missing files: {broken}"
