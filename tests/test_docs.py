"""The documentation lives in the repository and agrees with the code.

- docs/configuration.md is generated from engine/config.py and the `engine serve` flags; this
  fails when the committed file drifts (the message names the script to run).
- No file of the project points outside the repository or at a machine path.
- Every relative link in the README and docs/ leads to a file that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from scripts import gen_config_doc

ROOT = Path(__file__).resolve().parents[1]

TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".txt",
    ".toml",
    ".cfg",
    ".sh",
    ".yml",
    ".yaml",
    ".json",
    ".js",
    ".html",
    ".css",
    ".proto",
    ".c",
    ".in",
    "",
}
# Built from parts, so that this file does not match itself.
OUTSIDE = re.compile(r"\.\./" + r"shared|/" + r"work/|(?<![\w.:/])/(?:[\w.-]+/)+[\w.-]+\.md\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def project_files() -> list[Path]:
    """The files git tracks (or would: untracked, not ignored), as a clone would have them."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_configuration_doc_is_generated_from_config() -> None:
    current = gen_config_doc.OUT.read_text() if gen_config_doc.OUT.is_file() else ""
    assert current == gen_config_doc.render(), (
        f"docs/configuration.md differs from engine/config.py and the serve flags: "
        f"run `{gen_config_doc.COMMAND}` and commit the result"
    )


def test_configuration_doc_lists_every_setting() -> None:
    from dataclasses import fields

    from engine.config import Config

    text = gen_config_doc.render()
    for f in fields(Config):
        assert f"`ENGINE_{f.name.upper()}`" in text, f.name


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for path in project_files():
        if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = OUTSIDE.search(line)
            if match:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_the_check_finds_what_it_must() -> None:
    for line in (
        "see ../" + "shared/DESIGN.md",
        "the interface of /" + "work/briefs/x.md",
        "in /" + "etc/notes/a.md",
    ):
        assert OUTSIDE.search(line), line
    for line in ("docs/api.md", "see [the API](api.md)", "https://example.org/a/b.md", "./docs/a.md"):
        assert not OUTSIDE.search(line), line


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_api_doc_lists_every_route_and_metrics_doc_every_family() -> None:
    from engine.api.openai_routes import mount as mount_openai_routes
    from engine.api.rest import create_app
    from engine.metrics import Metrics

    # The OpenAI routes are documented in their own file.
    api = "".join(p.read_text() for p in (ROOT / "docs").glob("*.md") if p.name in ("api.md", "openai.md"))
    app = create_app(None, Metrics())  # type: ignore[arg-type]  # routes only
    mount_openai_routes(app, None)  # type: ignore[arg-type]
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith("/docs/"):  # FastAPI's own page helpers
            continue
        assert f"`{path}`" in api or f" {path}`" in api, f"docs/api.md does not document {path}"
    metrics = (ROOT / "docs" / "metrics.md").read_text()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        if not name.startswith("process_"):
            assert f"`{name}`" in metrics, f"docs/metrics.md does not document {name}"


MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
# Cited but not committed, on purpose: the benchmark suite writes report.md into its output folder.
NOT_COMMITTED = {"report.md"}


def test_every_cited_document_exists() -> None:
    """A module, test or doc that cites NAME.md or path/NAME.md cites a file of the repository."""
    files = project_files()
    names = {p.name for p in files if p.suffix == ".md"}
    paths = {p.relative_to(ROOT).as_posix() for p in files if p.suffix == ".md"}
    missing = []
    for path in files:
        if (
            path.suffix not in {".py", ".md", ".sh", ".toml", ".txt", ".yaml", ".yml"}
            or path.name == "test_docs.py"
        ):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for cited in MD_NAME.findall(line):
                if cited in NOT_COMMITTED:
                    continue
                if "/" in cited:
                    ok = (
                        cited in paths
                        or (path.parent / cited).resolve().relative_to(ROOT).as_posix() in paths
                    )
                else:
                    ok = cited in names
                if not ok:
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {cited}")
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)
