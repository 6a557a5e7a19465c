"""Every public name (each public module's ``__all__``) has an entry in the API pages.

The pages (docs/api/*.md) hold Sphinx autodoc directives (and ``py:data`` for constants,
whose own docstring would be their type's) inside ``{eval-rst}`` blocks. A name counts as
documented when a directive names the same object (under any path), or
when an ``automodule`` with ``:members:`` covers it: all of that module's ``__all__``
(autodoc's rule) that autodoc renders, that is a function or class with a docstring, or
a constant with a ``#:`` comment; an explicit ``:members: a, b`` list covers those names.
Dunder names (``__version__``) and submodules listed in ``__all__`` are not entries.
The check is static (it parses the directives and imports the modules), so it needs no Sphinx.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import softtopk

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api"
DIRECTIVE = re.compile(r"^\.\. ((?:auto|py:)\w+):: (\S+)\s*$")
OPTION = re.compile(r"^\s+:([\w-]+):\s*(.*)$")


def public_modules() -> list[str]:
    names = ["softtopk"]
    for info in pkgutil.walk_packages(softtopk.__path__, "softtopk."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts[1:]) or parts[1] == "cli":
            continue
        names.append(info.name)
    return names


def directives() -> list[tuple[str, str, dict[str, str]]]:
    """(directive, target, options) for every autodoc directive in the API pages."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for line in page.read_text().splitlines():
            if match := DIRECTIVE.match(line):
                found.append((match[1], match[2], {}))
            elif found and (match := OPTION.match(line)):
                found[-1][2][match[1]] = match[2].strip()
    return found


def resolve(target: str) -> object:
    """The object a dotted autodoc target names (module, then attributes)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def rendered_by_members(module: object, name: str) -> bool:
    """Whether ``automodule`` with a bare ``:members:`` renders ``name`` (it needs a doc)."""
    obj = getattr(module, name)
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj) or callable(obj):
        return bool(inspect.getdoc(obj))
    source = inspect.getsource(module)
    return re.search(rf"^#:.*\n{re.escape(name)}\b\s*[:=]", source, re.MULTILINE) is not None


def documented_objects() -> list[object]:
    objects = []
    for directive, target, options in directives():
        try:
            obj = resolve(target)
        except (ImportError, AttributeError):  # reported by test_every_api_entry_resolves
            continue
        objects.append(obj)
        if directive != "automodule" or "members" not in options:
            continue
        excluded = {n.strip() for n in options.get("exclude-members", "").split(",") if n.strip()}
        listed = [n.strip() for n in options["members"].split(",") if n.strip()]
        if listed:
            objects += [getattr(obj, n) for n in listed if hasattr(obj, n)]
            continue
        names = getattr(obj, "__all__", None)
        if names is None:  # autodoc takes the public members defined in the module itself
            names = [
                n
                for n, v in vars(obj).items()
                if not n.startswith("_") and getattr(v, "__module__", None) == obj.__name__
            ]
        objects += [getattr(obj, n) for n in names if n not in excluded and rendered_by_members(obj, n)]
    return objects


def test_every_public_name_has_an_api_entry():
    documented = documented_objects()
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if name.startswith("__") or inspect.ismodule(obj):  # a submodule's own __all__ is checked
                continue
            if not any(obj is d for d in documented):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without an entry in docs/api/*.md: {missing}"


def test_every_api_entry_resolves():
    stale = []
    for _, target, options in directives():
        try:
            obj = resolve(target)
        except (ImportError, AttributeError):
            stale.append(target)
            continue
        stale += [
            f"{target}.{n.strip()}"
            for n in options.get("members", "").split(",")
            if n.strip() and not hasattr(obj, n.strip())
        ]
    assert not stale, f"entries in docs/api/*.md that name nothing: {stale}"
