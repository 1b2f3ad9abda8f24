"""Build the API reference from the docstrings with pdoc: ``python docs/build_api.py``.

Writes HTML into ``docs/api`` (``--out DIR`` for another folder; open ``index.html``): one page
for the public API, every name of ``funcppo.__all__`` with its signature and docstring, one
for ``funcppo.random`` and one for the environments, ``funcppo.envs``. Needs the ``docs``
extra (``pip install -e '.[docs]'``).

The build fails, listing every problem, when a public name does not resolve (the package
imports its names on first use), a public function or class has no docstring, an annotation
in a signature names nothing, a public name is missing from its page, or pdoc warns.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import warnings
from pathlib import Path

# The modules documented; each page lists the module's ``__all__``.
MODULES = ("funcppo", "funcppo.envs")


def public_objects(module_name: str) -> tuple[dict[str, object], list[str]]:
    """``(name -> object for each name of the module's __all__, problems)``."""
    module = importlib.import_module(module_name)
    objects, problems = {}, []
    for name in module.__all__:
        try:
            objects[name] = getattr(module, name)
        except Exception as error:  # a lazy import that fails is the problem being reported
            problems.append(f"{module_name}.{name} does not resolve: {error!r}")
    return objects, problems


def check_docstrings(module_name: str, objects: dict[str, object]) -> list[str]:
    """A problem for each public function or class without a docstring."""
    return [
        f"{module_name}.{name} has no docstring"
        for name, obj in objects.items()
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj)
    ]


def fix_named_tuple_constructors(objects: dict[str, object]) -> None:
    """Let pdoc resolve a NamedTuple's field annotations in the module that defines it.

    ``collections.namedtuple`` builds ``__new__`` in a namespace of its own, so under
    ``from __future__ import annotations`` its string annotations (``"Tensor"``) name nothing
    there; pointing the function at the class's module makes them resolve as the class's do.
    """
    for obj in objects.values():
        if inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
            obj.__new__.__module__ = obj.__module__


def check_pages(out: Path, module_name: str, objects: dict[str, object]) -> list[str]:
    """A problem for each public name that has no entry on its module's page."""
    page = out / (module_name.replace(".", "/") + ".html")
    if not page.exists():
        return [f"{page} was not written"]
    html = page.read_text(encoding="utf-8")
    return [
        f"{module_name}.{name} is missing from {page}"
        for name, obj in objects.items()
        if not inspect.ismodule(obj) and f'id="{name}"' not in html
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "api")
    args = parser.parse_args(argv)

    import pdoc
    import pdoc.render

    problems, public = [], {}
    for module_name in MODULES:
        objects, unresolved = public_objects(module_name)
        public[module_name] = objects
        problems += unresolved + check_docstrings(module_name, objects)
        fix_named_tuple_constructors(objects)

    pdoc.render.configure(docformat="google", show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=args.out)
    problems += [f"pdoc: {w.message}" for w in caught]
    for module_name, objects in public.items():
        problems += check_pages(args.out, module_name, objects)

    if problems:
        print(f"API reference: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    names = sum(len(objects) for objects in public.values())
    print(f"API reference: {names} public names documented in {args.out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
