"""The documentation stays walkable: every relative link in the README and docs/ points at a
file (and heading) that exists, the README stays short and links every docs page, every recipe
field is in docs/recipes.md's table, and every script answers --help without side effects."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return _LINK.findall(_prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped (code-span
    backticks and link syntax too, their text kept), spaces to hyphens, -1, -2 for repeats."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for _, title in _HEADING.findall(text):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if ROOT not in (dest, *dest.parents):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return bad


def test_the_checker_sees_broken_links_and_anchors(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Top `x` / y\n## Top x y\n```\n[no](missing.md)\n```\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#top-x--y) [ok2](a.md#top-x-y) [`c`](a.md) [web](https://x.y/z)\n"
                    "[gone](missing.md) [anchor](a.md#nope) [up](../../etc/passwd) `[code](nope.md)`\n")
    assert broken_links(tmp_path / "a.md") == []
    assert [b.split(":")[0] for b in broken_links(page)] == [
        "missing.md", "a.md#nope", "../../etc/passwd"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_headings(page):
    assert broken_links(page) == []


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < README_MAX_LINES, \
        f"README.md has {len(text.splitlines())} lines; move detail into docs/"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert missing == [], f"README.md does not link these docs pages: {missing}"


def test_every_recipe_field_is_in_the_docs_table():
    from mopd_megatron.config import MOPDConfig, field_docs
    table = (DOCS / "recipes.md").read_text(encoding="utf-8")
    missing = [path for path, *_ in field_docs(MOPDConfig, "") if f"| `{path}` |" not in table]
    assert missing == [], ("recipe fields missing from docs/recipes.md: "
                           f"{missing}; run python -m mopd_megatron.config.docs docs/recipes.md")


SCRIPTS = sorted([*ROOT.glob("tools/*.sh"), *ROOT.glob("tools/*.py"), *ROOT.glob("slurm/*.sh"),
                  *ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/*.sh")])
GPU_SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
# What a real GPU-suite run writes; --help/--list/--dry-run and a refused run must leave them be.
GPU_SUITE_OUTPUTS = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "benchmarks" / "gpu_suite_results.json"]


def run_script(script: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``script args`` from an empty directory; fails the test if it created a venv or wrote a
    file there."""
    # The environment scripts would create these venvs if --help fell through to the install.
    venvs = {"VENV": tmp_path / "venv", "VENV312": tmp_path / "venv312"}
    env = {**os.environ, **{k: str(v) for k, v in venvs.items()},
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "OUT"):  # never inside an allocation here
        env.pop(k, None)
    cmd = ["bash", str(script), *args] if script.suffix == ".sh" else \
        [sys.executable, str(script), *args]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert not any(v.exists() for v in venvs.values()), f"{script.name} {args} created a venv"
    assert list(tmp_path.iterdir()) == [], f"{script.name} {args} wrote {list(tmp_path.iterdir())}"
    return r


def _snapshot(paths: list[Path]) -> dict:
    return {p: p.read_bytes() if p.exists() else None for p in paths}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_answers_help_without_side_effects(script, tmp_path):
    before = _snapshot(GPU_SUITE_OUTPUTS)
    r = run_script(script, ["--help"], tmp_path)
    assert r.returncode == 0, f"{script.name} --help exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "usage" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert _snapshot(GPU_SUITE_OUTPUTS) == before, f"{script.name} --help changed the results"


@pytest.mark.parametrize("flag", ["--list", "--dry-run"])
def test_gpu_suite_lists_its_checks_without_side_effects(flag, tmp_path):
    before = _snapshot(GPU_SUITE_OUTPUTS)
    r = run_script(GPU_SUITE, [flag], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("loss_kernel", "te_parity", "packed_thd", "memory_plan", "fp8_step", "sglang_cuda"):
        assert name in r.stdout, r.stdout
    assert _snapshot(GPU_SUITE_OUTPUTS) == before, f"gpu_suite.sh {flag} changed the results"
    only = run_script(GPU_SUITE, [flag, "--only", "fp8_step,loss_kernel"], tmp_path)
    assert only.returncode == 0 and "sglang_cuda" not in only.stdout, only.stdout + only.stderr
    bad = run_script(GPU_SUITE, [flag, "--skip", "no_such_check"], tmp_path)
    assert bad.returncode == 2 and "no_such_check" in bad.stderr, bad.stdout + bad.stderr


def test_gpu_suite_refuses_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: a real run would measure")
    before = _snapshot(GPU_SUITE_OUTPUTS)
    r = run_script(GPU_SUITE, [], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "no CUDA device: this suite only runs on a GPU; use --list/--dry-run here"], r.stderr
    assert r.stdout == "", r.stdout
    assert _snapshot(GPU_SUITE_OUTPUTS) == before, "a refused run changed the results"
