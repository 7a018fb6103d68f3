"""The bad-input corpus (tests/bad_inputs/cases.yaml) through the real `tskd-tune` CLI.

For every case: exit status 2; exactly one line of output, on stderr, starting with ``error:`` and
holding every expected fragment (the first names the file or YAML path); no traceback; no secret
echoed; and nothing half-written: the command leaves no file behind in its working directory (where
its --out, cache and storage folders point) except empty lock files, and changes no input file.

A sample of cases (``subprocess: true``: every command but `synth`, whose diffusers import alone takes
20 s, and every kind of input) runs as a real ``python -m tskd_tune`` subprocess; the rest call ``tskd_tune.cli.main`` in this
process with the output captured at the file-descriptor level. A subprocess costs 0.6 s for `validate`
and 5-10 s for commands that import torch and timm, on an idle 2-core machine; 100 of them would take
minutes, and the process boundary adds nothing a sample does not already show.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def case_id(case: dict) -> str:
    return case.get("id") or Path(case["case"]).stem


class _Payload:
    """Unpickling this calls open("PWNED", "w"): an unsafe loader would create the file."""

    def __reduce__(self):
        return (open, ("PWNED", "w"))


def _pickle_payload(folder: Path) -> None:
    # generated rather than committed: a checkpoint that runs code when unpickled
    (folder / "payload.pth").write_bytes(pickle.dumps({"weight": _Payload()}, protocol=2))


BUILDERS = {"pickle_payload": _pickle_payload}


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(args: list[str], work: Path, subprocess_: bool, monkeypatch, capfd) -> tuple[int, str, str]:
    if subprocess_:
        proc = subprocess.run(
            [sys.executable, "-m", "tskd_tune", *args], cwd=work, capture_output=True, text=True, timeout=180
        )
        return proc.returncode, proc.stdout, proc.stderr
    from tskd_tune.cli import main

    monkeypatch.chdir(work)
    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_refused_in_one_line(case, tmp_path, monkeypatch, capfd):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(CORPUS / "_valid.yaml", work / "_valid.yaml")
    copy = None
    if case.get("case"):
        src, copy = CORPUS / case["case"], work / case["case"]
        if src.is_dir():
            shutil.copytree(src, copy)
        else:
            shutil.copy(src, copy)
    if case.get("build"):
        BUILDERS[case["build"]](copy)
    subst = {"{case}": str(copy), "{valid}": str(work / "_valid.yaml"), "{work}": str(work)}
    args = []
    for a in case["args"]:
        for k, v in subst.items():
            a = a.replace(k, v)
        args.append(a)
    before = snapshot(work)

    code, out, err = run_cli(args, work, case.get("subprocess", False), monkeypatch, capfd)

    assert "Traceback" not in out + err, err[-3000:]
    assert code == 2, (code, out[-1000:], err[-3000:])
    assert out.strip() == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in case["expect"]:
        for k, v in subst.items():
            fragment = fragment.replace(k, v)
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    if case.get("secret"):
        assert case["secret"] not in out + err
    for name in case.get("absent", []):
        assert not (work / name).exists(), f"{name} was created"
    after = snapshot(work)
    changed = [p for p in before if after.get(p) != before[p]]
    assert changed == [], f"input files changed or removed: {changed}"
    empty = hashlib.sha256(b"").hexdigest()
    left = [p for p in after if p not in before and not (p.endswith(".lock") and after[p] == empty)]
    assert left == [], f"files left behind: {left}"


def test_corpus_is_large_and_every_file_is_a_case():
    ids = [case_id(c) for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    named = {c["case"] for c in CASES if c.get("case")}
    on_disk = {p.name for p in CORPUS.iterdir() if not p.name.startswith("_") and p.name != "cases.yaml"}
    assert on_disk == named
    assert all(c["expect"] and c["args"] for c in CASES)
    commands = {c["args"][0] for c in CASES}
    assert commands <= {c["args"][0] for c in CASES if c.get("subprocess")} | {"synth"}
