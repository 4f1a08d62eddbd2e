"""The docs name only what exists: every code name in README.md, docs/ and the source's docstrings
(`snake_case` or `recon_runtime.x.y`) is defined in the project's code (src/ and benchmarks/, never
tests/: a test's strings and helpers are not what a user can call)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
OURS = ("recon_runtime", "recon_export", "benchmarks")
# names the docs use from other projects: librosa's recipe they warn against; OpenVINO's rt_info and
# keys; the diffusers pipeline arguments docs/pipelines.md calls
EXTERNAL = {
    "power_to_db",
    "rt_info",
    "disable_fp16_compression_0",
    "precise_0",
    "output_type",
    "audio_length_in_s",
    "prompt_embeds",
    "generated_prompt_embeds",
}
# what prometheus_client appends to a metric's name
METRIC_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_created")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
NAME = re.compile(r"(?<![\w./:-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?![\w./*-])")  # not paths, not globs


def _docstrings(tree: ast.AST) -> list[ast.Constant]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)]


def defined_names() -> set[str]:
    """Identifiers, attributes, arguments, module names and words of string literals in the code
    (string literals hold JSON keys and metric names); docstrings excluded, they are what is checked."""
    names = {p.stem for p in CODE} | {p.parent.name for p in CODE}  # modules and packages
    for path in CODE:
        tree = ast.parse(path.read_text(), str(path))
        docs = {id(d) for d in _docstrings(tree)}
        for node in ast.walk(tree):
            for attr in ("name", "id", "attr", "arg", "asname"):
                value = getattr(node, attr, None)
                if isinstance(value, str):
                    names.update(value.split("."))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                names.update(re.findall(r"\w+", node.value))
    return names


def documented() -> list[tuple[str, str]]:
    """(where, code span) for every code span in the docs and in the source's docstrings."""
    texts = [(p, p.read_text()) for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]]
    for path in (ROOT / "src").rglob("*.py"):
        texts += [(path, d.value) for d in _docstrings(ast.parse(path.read_text())) if isinstance(d.value, str)]
    return [(str(p.relative_to(ROOT)), span) for p, text in texts for span in CODE_SPAN.findall(text)]


def _known(part: str, names: set[str]) -> bool:
    base = next((part[: -len(x)] for x in METRIC_SUFFIXES if part.endswith(x)), part)
    return part in names or base in names or part in EXTERNAL


def dangling(spans: list[tuple[str, str]], names: set[str]) -> list[str]:
    """The spans that name something of ours that the code does not define."""
    bad = []
    for where, span in spans:
        for ref in NAME.findall(span):
            parts = ref.split(".")
            if len(parts) > 1 and parts[0] not in OURS:
                continue  # another library's API (torch.hann_window)
            if (len(parts) == 1 and "_" not in ref) or ref.isupper():
                continue  # a plain word; environment variables and shell settings
            if not all(_known(p, names) for p in parts):
                bad.append(f"{where}: `{span}`")
    return bad


def test_the_check_finds_a_name_that_does_not_exist() -> None:
    names = {"read_contract", "verify_graph_file", "recon_runtime", "contract", "recon_requests"}
    spans = [("a.md", "see `verify_bundle`"), ("a.md", "read_contract(path)"), ("b.md", "recon_runtime.contract")]
    spans += [("c.md", "recon_requests_total"), ("c.md", "torch.hann_window(1024)"), ("c.md", "RECON_MODEL")]
    assert dangling([(w, s) for w, text in spans for s in [text.split("`")[1] if "`" in text else text]], names) == [
        "a.md: `verify_bundle`"
    ]


def test_names_count_only_from_the_projects_code() -> None:
    """A word in a test's string literal (or a test helper) defines nothing a user can call."""
    assert CODE and all((ROOT / "tests") not in p.parents for p in CODE)
    names = defined_names()
    assert "read_sidecar" in names and "npy_sha256" in names  # a function, a JSON key (a string in src/)
    assert "full_for_sidecars" not in names  # a helper of tests/test_cli_jobs.py


def test_docs_and_docstrings_name_only_what_exists() -> None:
    spans = documented()
    assert len(spans) > 200
    assert not (bad := dangling(spans, defined_names())), "names that exist nowhere in the code:\n" + "\n".join(bad)


def test_the_readme_names_every_route_of_the_server() -> None:
    """A user who reads the README's Serving section finds every route (the page's /v1/compare too)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("fastapi") is None:
        pytest.skip("the routes come from the app: the `serve` extra (fastapi) is missing")
    from recon_runtime.serving.app import create_app
    from recon_runtime.serving.config import ServerConfig

    routes = set(create_app(ServerConfig(model="unused")).openapi()["paths"])
    assert {"/v1/reconstruct", "/v1/compare"} <= routes
    readme = (ROOT / "README.md").read_text()
    assert not (missing := sorted(r for r in routes if r not in readme)), f"README.md names no {missing}"


# ---------------------------------------------------------------------- links to headings
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
EXPLICIT_ANCHOR = re.compile(r"""<a\s+(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def _prose(text: str) -> list[str]:
    """The lines of a markdown file outside fenced and indented code blocks (their links are not links)."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is not None:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = None
            continue
        if marker:
            fence = marker.group(1)
            continue
        lines.append("" if line.startswith(("    ", "\t")) else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (a link's text, not its target), lowercased, punctuation
    but '-' and '_' dropped, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a markdown file has: its headings' slugs (a repeated one gets -1, -2, ... as on
    GitHub) and explicit `<a id=...>` / `<a name=...>`."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(text):
        if m := HEADING.match(line):
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(EXPLICIT_ANCHOR.findall(line))
    return found


def broken_anchors(files: list[Path], root: Path) -> list[str]:
    """Relative links with a `#anchor` in `files` whose target file is missing or has no such anchor."""
    bad = []
    for path in files:
        for line in _prose(path.read_text()):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or "#" not in target:
                    continue  # another site (https:, mailto:), or a file without an anchor
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                where = f"{path.relative_to(root)}: ({target})"
                if not dest.is_file():
                    bad.append(f"{where}: no file {file}")
                elif dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                    bad.append(f"{where}: no heading or <a id> {anchor!r} in {dest.relative_to(root)}")
    return bad


def test_the_anchor_check_follows_githubs_slugs_and_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Defaults on the CPU: hint, batch and backend\n\n## `POST /v1/compare`\n\n## Notes\n\n## Notes\n\n"
        "```\n# not a heading\n[x](#not-a-heading)\n```\n\n"
        '<a id="kept"></a>Text.\n\n'
        "[ok](#defaults-on-the-cpu-hint-batch-and-backend) [ok](#post-v1compare) [ok](#notes-1) [ok](#kept)\n"
        "[bad](#defaults-on-the-cpu-hint-and-batch) [bad](#not-a-heading) [web](https://example.org/#x)\n"
    )
    (tmp_path / "README.md").write_text("[ok](docs/a.md#notes) [bad](docs/a.md#nowhere) [bad](docs/b.md#x)\n")
    files = [tmp_path / "README.md", tmp_path / "docs" / "a.md"]
    assert broken_anchors(files, tmp_path) == [
        "README.md: (docs/a.md#nowhere): no heading or <a id> 'nowhere' in docs/a.md",
        "README.md: (docs/b.md#x): no file docs/b.md",
        "docs/a.md: (#defaults-on-the-cpu-hint-and-batch): no heading or <a id> "
        "'defaults-on-the-cpu-hint-and-batch' in docs/a.md",
        "docs/a.md: (#not-a-heading): no heading or <a id> 'not-a-heading' in docs/a.md",
    ]


def test_every_link_to_a_heading_in_the_docs_resolves() -> None:
    links = [t for p in DOC_FILES for line in _prose(p.read_text()) for t in LINK.findall(line) if "#" in t]
    assert len(links) > 10, links  # the check sees the docs' links
    assert not (bad := broken_anchors(DOC_FILES, ROOT)), "links to headings that do not exist:\n" + "\n".join(bad)


def test_the_readmes_python_example_runs_as_written(tiny_bundle: Path, tmp_path: Path) -> None:
    """README's library example, run on a tiny bundle (its path for the README's) in a folder with an
    in.flac: every call exists and does what its comment says (length and level restored)."""
    import os
    import subprocess
    import sys

    import numpy as np
    import soundfile as sf

    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "encode_audio(rec" in b]
    assert '"models/audioldm2-music"' in block
    code = block.replace('"models/audioldm2-music"', repr(str(tiny_bundle)))
    code += (
        "\nimport numpy as np\n"
        "restored = decode_audio(rec, EncodedAudio.load('in.safetensors'))\n"
        "assert restored.shape == out.shape, (restored.shape, out.shape)\n"
        "assert abs(np.abs(restored).max() / np.abs(out).max() - 1) < 0.05\n"
        "assert wave.shape == out.shape\n"
    )
    t = np.arange(20000) / 22050
    sf.write(tmp_path / "in.flac", (0.05 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "in.safetensors").is_file()
