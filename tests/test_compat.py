"""dsft's coupling to its stack is named in one place (dsft/compat.py) and checked: the installed versions
are the ones dsft was tested on and pyproject.toml allows, every private member dsft touches exists, the
list names every one the code uses, and a version outside the tested ones is said on the console."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from conftest import REPO

from dsft import compat


def pins() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(d).name.lower().replace("_", "-"): Requirement(d) for d in project["dependencies"]}


def test_installed_versions_are_the_tested_ones_and_inside_the_pins() -> None:
    outside = compat.outside_tested()
    assert not outside, ("installed outside the versions dsft/compat.py TESTED names; test dsft on them and "
                         f"update TESTED and pyproject.toml's pins: {outside}")
    declared = pins()
    for package, tested in compat.TESTED.items():
        requirement = declared.get(package.lower().replace("_", "-"))
        assert requirement is not None, f"{package}: in compat.TESTED but not a dependency in pyproject.toml"
        assert any(s.operator == "<" for s in requirement.specifier), f"{requirement}: no upper bound"
        installed = version(package).split("+")[0]
        assert requirement.specifier.contains(installed), f"{package} {installed} outside pyproject's {requirement}"
        # the bound is the next minor after the tested one: a new minor is a new test, not a silent install
        assert not requirement.specifier.contains(_next_minor(tested)), f"{requirement} admits untested {tested}+1"


def _next_minor(tested: str) -> str:
    major, minor = tested.split(".")
    return f"{major}.{int(minor) + 1}.0"


def test_every_private_member_dsft_uses_exists() -> None:
    assert not compat.missing(), "the installed stack lacks members dsft relies on:\n" + "\n".join(compat.missing())
    from trl import GRPOTrainer, SFTTrainer

    for owner, names in compat.INSTANCE.items():
        cls = {"trl:GRPOTrainer": GRPOTrainer, "trl:SFTTrainer": SFTTrainer}[owner]
        import inspect

        source = inspect.getsource(cls.__init__)
        for name in names:
            assert f"self.{name} =" in source, f"{owner}.__init__ no longer sets {name}"


def test_a_missing_member_is_named() -> None:
    gone = compat.Private("trl:GRPOTrainer._no_such_member", "a test", "tests/test_compat.py")
    assert not gone.found() and not compat.Private("no_such_module:X", "a test", "nowhere").found()


def test_the_list_names_every_private_member_the_code_uses() -> None:
    """Every `super()._name(`, `trainer._name` and `self._name` of a TRL/transformers member in dsft's trainers
    is listed (the module's own privates are not TRL's)."""
    listed = {re.split("[.:]", p.path)[-1] for p in compat.PRIVATE} | {n for names in compat.INSTANCE.values() for n in names}
    for path in ("dsft/train/trainer.py", "dsft/train/grpo.py", "dsft/train/resume.py"):
        text = (REPO / path).read_text()
        own = set(re.findall(r"def (_\w+)\(", text)) | set(re.findall(r"self\.(_\w+) *[:=]", text))
        overridden = set(re.findall(r"super\(\)\.(_[a-z]\w*)", text))
        used = overridden | (set(re.findall(r"(?:trainer|self)\.(_[a-z]\w*)", text)) - own)
        assert used <= listed, f"{path} uses {sorted(used - listed)}: name them in dsft/compat.py PRIVATE"
    for p in compat.PRIVATE:
        assert re.split("[.:]", p.path)[-1] in (REPO / p.where).read_text(), f"{p.where} no longer uses {p.path}"


def test_a_library_outside_the_tested_versions_is_said_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from dsft.cli._common import untested

    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda p: "1.17.0" if p == "trl" else real(p))
    monkeypatch.delenv("RANK", raising=False)
    untested()
    err = capsys.readouterr().err
    assert "trl 1.17.0 (dsft was checked on 1.16.x)" in err and err.count("warning:") == 1
    monkeypatch.setenv("RANK", "1")
    untested()
    assert capsys.readouterr().err == ""
