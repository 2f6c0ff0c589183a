"""Method registry: the catalogue of every method id, and the pipelines that implement them.

A method is implemented by a module ``methods/<family>/<id>.py`` that exposes ``PIPELINE``; the
registry finds it by name, so adding a method touches nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

import yaml

import methods
from pipelines.config import suggestion
from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.pipeline import Pipeline


@dataclass(frozen=True)
class Entry:
    """One catalogue row; ``module`` is None while the method is planned."""

    id: str
    title: str
    family: str
    goal: str
    pearl_level: str
    stage: str
    data_requirements: str
    module: str | None

    @property
    def status(self) -> str:
        return "implemented" if self.module else "planned"

    def pipeline(self) -> Pipeline:
        if self.module is None:
            raise UserError(f"method {self.id!r} is planned, not implemented yet")
        return importlib.import_module(self.module).PIPELINE


@cache
def _method_modules() -> dict[str, str]:
    """Leaf module name -> dotted path, for every module under ``methods/``."""
    found = {}
    for info in pkgutil.walk_packages(methods.__path__, "methods."):
        if not info.ispkg:
            found[info.name.rsplit(".", 1)[1]] = info.name
    return found


@cache
def catalogue() -> dict[str, Entry]:
    data = yaml.safe_load(resources.files("pipelines").joinpath("catalog.yaml").read_text())
    modules = _method_modules()
    return {row["id"]: Entry(**row, module=modules.get(row["id"])) for row in data["methods"]}


def taxonomy_source() -> str:
    data = yaml.safe_load(resources.files("pipelines").joinpath("catalog.yaml").read_text())
    return data["taxonomy_source"]


def get(method_id: str) -> Entry:
    entries = catalogue()
    if method_id not in entries:
        raise UserError(f"unknown method {method_id!r}{suggestion(method_id, entries)} (see `gradworks list`)")
    return entries[method_id]
