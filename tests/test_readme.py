"""The README's Quick start, Using it and Python API blocks, run in the order written on a temporary copy of the
repository, so the README cannot drift from the code.

The rules, each visible in the README:
- Which blocks: every ```bash and ```python block under `## Quick start`, `## Using it` and `## Python API`, in
  order, as one shell session (an `. .venv/bin/activate` holds for the blocks after it). A block whose previous
  non-blank line is `<!-- not run by tests: REASON -->` is skipped (the test suite itself, a server).
- Set-up lines: a line that creates the virtual environment (`python3 -m venv .venv && ... && CMD`) runs only CMD,
  what follows its last `&&`; the copy's `.venv` is a link to the environment running this test.
- Short runs: every `ray-kd train|train-teacher|tune|cache-teacher` line gets `optim.epochs=1 optim.steps_per_epoch=2`
  appended (before a trailing `#` comment), as the README's Using it says it may. Python blocks run as written,
  with the venv's python.
- Environment: MLFLOW_TRACKING_URI is a sqlite store in the copy, RAY_ADDRESS is unset, so each command starts a
  local Ray cluster of its own (`ray_kd.ray_executor.connect` starts one with `address="local"`), never joining the
  test session's; PYTHONPATH is the copy, so the copy's code runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SECTIONS = ("Quick start", "Using it", "Python API")
SKIP = re.compile(r"^<!-- not run by tests: .+ -->$")
SETUP = "python3 -m venv .venv && "
SHORT = "optim.epochs=1 optim.steps_per_epoch=2"
SHORTENED = re.compile(r"^(\s*(?:\.venv/bin/)?ray-kd (?:train|train-teacher|tune|cache-teacher) [^#]*?)(\s*#.*)?$")


def readme_blocks(text: str) -> list[tuple[str, str, str, bool]]:
    """(section, language, code, skipped) of every fenced block of SECTIONS, in order."""
    blocks, section, previous, lines = [], None, "", iter(text.splitlines())
    for line in lines:
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```") and line[3:].strip():
            code = []
            for inner in lines:
                if inner.startswith("```"):
                    break
                code.append(inner)
            if section in SECTIONS:
                blocks.append((section, line[3:].strip(), "\n".join(code), bool(SKIP.match(previous))))
        if line.strip():
            previous = line.strip()
    return blocks


def as_run(line: str) -> str:
    """A README shell line as the test runs it: the set-up rule, then the short-run rule."""
    if line.startswith(SETUP):
        line = line.rsplit("&&", 1)[1].strip()
    match = SHORTENED.match(line)
    return f"{match.group(1)} {SHORT}{match.group(2) or ''}" if match else line


def session_script(blocks, folder: Path) -> str:
    """One bash script running the blocks in order; python blocks are files run with the venv's python."""
    script = ["set -euxo pipefail"]
    for i, (_, language, code, skipped) in enumerate(blocks):
        if skipped:
            continue
        if language == "bash":
            script += [as_run(line) for line in code.splitlines()]
        else:
            assert language == "python", f"a ```{language} block in a tested section"
            (folder / f"readme_block_{i}.py").write_text(code + "\n")
            script.append(f".venv/bin/python readme_block_{i}.py")
    return "\n".join(script) + "\n"


def repository_copy(dest: Path) -> Path:
    """The tracked files of this checkout (as they are on disk), and `.venv` linked to this test's environment."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def test_the_rules_pick_the_blocks_a_user_runs_first():
    blocks = readme_blocks(README.read_text())
    assert [s for s, *_ in blocks if s not in SECTIONS] == []
    assert {s for s, *_ in blocks} == set(SECTIONS)
    first = blocks[0][2]
    assert first.startswith(SETUP) and as_run(first) == f".venv/bin/ray-kd train --config configs/digits_dml.yaml {SHORT}"
    assert any(skipped and "pytest" in code for _, _, code, skipped in blocks)  # the test suite is not run by itself
    assert any(code.strip() == ". .venv/bin/activate" for _, _, code, skipped in blocks if not skipped)
    assert as_run("ray-kd train -c x.yaml a=1   # note") == f"ray-kd train -c x.yaml a=1 {SHORT}   # note"
    assert as_run("ray-kd models   # the zoo") == "ray-kd models   # the zoo"


def test_readme_links_and_length():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert targets and [t for t in targets if not (REPO / t).exists()] == []


def test_readme_blocks_run_in_order_on_a_fresh_copy(tmp_path):
    repo = repository_copy(tmp_path / "repo")
    (repo / "readme.sh").write_text(session_script(readme_blocks(README.read_text()), repo))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(repo), MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    done = subprocess.run(["bash", "readme.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]

    runs = repo / "runs"
    for name in ("digits-dml", "dml-seed3", "digits-teacher", "digits-kd", "digits-alone", "api-teacher", "api-kd"):
        assert json.loads((runs / name / "summary.json").read_text())["epochs"] >= 1, name
    assert json.loads((runs / "dml-seed3" / "fingerprint.json").read_text())["seed"] == 3
    assert "nothing to do" in output  # the Quick start's run, rerun as written, is found finished, not refused
    assert (runs / "digits_teacher.pt").is_file() and (runs / "api_teacher.pt").is_file()
    assert (runs / "report" / "report.md").is_file()
    assert "'computed'" in output
