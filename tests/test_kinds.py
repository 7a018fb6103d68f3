"""The declared kinds (``tskd_tune.kinds``): each has what builds or runs it, nothing registers an undeclared
one, an unknown name is one line naming its YAML field, and the config stays free of torch. (That the
config's Literals list exactly the declared names is ``test_architecture``'s to hold.)"""

import subprocess
import sys

import pytest

from tskd_tune.config import DistillConfig, StudentConfig, SyntheticConfig, validate
from tskd_tune.errors import ConfigError, TskdError
from tskd_tune.kinds import (
    GENERATOR_KINDS,
    METHOD_NAMES,
    STUDENT_KINDS,
    GeneratorKind,
    generator_kind,
    names_where,
    student_kind,
)


def test_every_declared_kind_has_what_builds_or_runs_it():
    from tskd_tune.methods import METHODS
    from tskd_tune.models.students import STUDENTS

    assert list(STUDENTS) == list(STUDENT_KINDS)
    assert set(METHODS) == set(METHOD_NAMES)


def test_an_undeclared_name_cannot_register():
    from tskd_tune.methods import METHODS, MethodSpec, register_method
    from tskd_tune.models.students import STUDENTS, register_student

    with pytest.raises(
        ValueError, match=r"^student 'resnet' is not declared in tskd_tune.kinds.STUDENT_KINDS$"
    ):
        register_student("resnet")
    spec = MethodSpec("kd", run=print, teacher=None, transfer=False, student=True)
    with pytest.raises(ValueError, match=r"^method 'kd' is not declared in tskd_tune.kinds.METHOD_NAMES$"):
        register_method(spec)
    assert "resnet" not in STUDENTS and "kd" not in METHODS


def test_what_callers_ask_of_each_kind():
    # the answers the names gave when callers compared them
    assert {n: (k.encoder, k.vit) for n, k in STUDENT_KINDS.items()} == {
        "unet": (False, False),
        "timm_unet": (True, False),
        "vit_tiny": (False, True),
    }
    assert {n: (k.images, k.trained, k.folder) for n, k in GENERATOR_KINDS.items()} == {
        "none": (False, False, False),
        "ddpm": (True, True, False),
        "pretrained": (True, False, True),
    }
    assert names_where(GENERATOR_KINDS, "images") == "ddpm or pretrained"
    assert names_where(STUDENT_KINDS, "vit") == "vit_tiny"
    assert names_where(STUDENT_KINDS, "encoder") == "timm_unet"
    three = {n: GeneratorKind(n, images=True, trained=False, folder=False) for n in "abc"}
    assert names_where(three, "images") == "a, b or c"


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (
            {"student": {"model": "resnet"}},
            "student.model: must be one of 'unet', 'timm_unet' or 'vit_tiny', got 'resnet'",
        ),
        (
            {"synthetic": {"generator": "gan"}},
            "synthetic.generator: must be one of 'none', 'ddpm' or 'pretrained', got 'gan'",
        ),
        (
            {"distill": {"method": "kd"}},
            "distill.method: must be one of 'ts_kd', 'ta_kd', 'mae', 'scratch' or 'teacher', got 'kd'",
        ),
    ],
)
def test_an_unknown_name_is_one_line_naming_the_field(raw, line):
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert info.value.problems == [line]
    assert str(info.value) == line


def test_a_lookup_of_an_unknown_name_names_the_field():
    known = r"\(known: unet, timm_unet, vit_tiny\)"
    with pytest.raises(TskdError, match=rf"^student.model: unknown student 'resnet' {known}$"):
        student_kind("resnet")
    known = r"\(known: none, ddpm, pretrained\)"
    with pytest.raises(TskdError, match=rf"^synthetic.generator: unknown generator 'gan' {known}$"):
        generator_kind("gan")


@pytest.mark.parametrize(
    ("section", "field", "names"),
    [
        (StudentConfig, "model", STUDENT_KINDS),
        (SyntheticConfig, "generator", GENERATOR_KINDS),
        (DistillConfig, "method", METHOD_NAMES),
    ],
)
def test_each_fields_help_names_every_kind(section, field, names):
    description = section.model_fields[field].description
    assert [n for n in names if n not in description] == []


def test_the_config_imports_no_torch():
    # the Literals are built from tskd_tune.kinds, not from the modules that build the kinds
    code = "import sys, tskd_tune.config; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_model_card_keeps_the_encoder_of_a_student_that_has_one():
    from tskd_tune.export import _student_card

    assert _student_card(StudentConfig(model="timm_unet", encoder="resnet34"))["encoder"] == "resnet34"
    assert "encoder" not in _student_card(StudentConfig(model="vit_tiny"))
