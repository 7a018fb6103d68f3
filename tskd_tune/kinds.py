"""The plug-in kinds a config may name, declared once: students, synthetic generators, methods.

Each kind is a name and what the rest of the code needs to know about it (does a student take a timm
encoder, is a generator trained here); callers ask the kind instead of comparing names. The config's
``Literal`` types are built from these tables, so a YAML file may name exactly what is declared here.

This module is light (the config imports it, and the config imports no torch). What builds or runs a kind
lives beside the models and registers under the same name, refusing one not declared here: the student
factories in :mod:`tskd_tune.models.students`, the methods in :mod:`tskd_tune.methods` (each module
registers its :class:`~tskd_tune.methods.registry.MethodSpec`). The generators are built by
:mod:`tskd_tune.synth.pool` from their kind's properties.
"""

from __future__ import annotations

from dataclasses import dataclass

from tskd_tune.errors import TskdError


@dataclass(frozen=True)
class StudentKind:
    """A student architecture (``student.model``)."""

    name: str
    encoder: bool
    """It is built around the timm encoder named by ``student.encoder`` (which its model card keeps)."""
    vit: bool
    """Its encoder is a ViT, which runs on any subset of its patch tokens: ``mae`` can pretrain it."""


@dataclass(frozen=True)
class GeneratorKind:
    """A source of synthetic transfer images (``synthetic.generator``)."""

    name: str
    images: bool
    """It makes images (``none`` does not: there is no synthetic pool)."""
    trained: bool
    """It is trained here on the training images (the ``synthetic.*`` training knobs apply) and cached."""
    folder: bool
    """It is loaded from the diffusers pipeline folder ``synthetic.pretrained_path``."""


STUDENT_KINDS: dict[str, StudentKind] = {
    k.name: k
    for k in (
        StudentKind("unet", encoder=False, vit=False),
        StudentKind("timm_unet", encoder=True, vit=False),
        StudentKind("vit_tiny", encoder=False, vit=True),
    )
}

GENERATOR_KINDS: dict[str, GeneratorKind] = {
    k.name: k
    for k in (
        GeneratorKind("none", images=False, trained=False, folder=False),
        GeneratorKind("ddpm", images=True, trained=True, folder=False),
        GeneratorKind("pretrained", images=True, trained=False, folder=True),
    )
}

# the methods' names (in the order the config's error lists them); what each needs is its MethodSpec's to
# say, registered by the method's own module, which imports torch
METHOD_NAMES: tuple[str, ...] = ("ts_kd", "ta_kd", "mae", "scratch", "teacher")


def student_kind(name: str) -> StudentKind:
    """The kind of ``student.model`` ``name``."""
    return _lookup(STUDENT_KINDS, name, "student.model", "student")


def generator_kind(name: str) -> GeneratorKind:
    """The kind of ``synthetic.generator`` ``name``."""
    return _lookup(GENERATOR_KINDS, name, "synthetic.generator", "generator")


def names_where(table: dict, flag: str) -> str:
    """The names of ``table`` whose ``flag`` is true, for a message: ``a``, ``a or b``, ``a, b or c``."""
    names = [n for n, k in table.items() if getattr(k, flag)]
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _lookup(table: dict, name: str, field: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise TskdError(f"{field}: unknown {what} {name!r} (known: {', '.join(table)})") from None
