"""`pipeline.extract` is two things: the API function (`from pipeline import extract`) and the
stage's module (`from pipeline.extract import run_extract`). Python's import system sets a
package attribute to each submodule it imports, which would replace the function with the
module. So the function is wrapped in a `Stage`, which calls like the function and reads and
writes attributes of the module (`import pipeline.extract as ex; ex.run_extract`, and
monkeypatching, keep working), and the package keeps its Stage when the submodule is imported.
Standard library only: `import pipeline` stays light.
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Callable


class Stage:
    def __init__(self, fn: Callable, module: str):
        # Set with object.__setattr__: this class's __setattr__ writes to the module. The names
        # inspect and help() read are copied as functools.wraps would.
        for name, value in {"_fn": fn, "_module": module, "__wrapped__": fn, "__name__": fn.__name__,
                            "__qualname__": fn.__qualname__, "__module__": fn.__module__, "__doc__": fn.__doc__}.items():
            object.__setattr__(self, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def _stage_module(self) -> types.ModuleType:
        return importlib.import_module(self._module)

    def __getattr__(self, name: str) -> Any:  # only for what the Stage itself lacks: the module's names
        return getattr(self._stage_module(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._stage_module(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._stage_module(), name)

    @property
    def __dict__(self) -> dict:  # type: ignore[override]  # what vars() and pytest's monkeypatch read: the module's
        return vars(self._stage_module())

    def __repr__(self) -> str:
        return f"<function {self._fn.__module__}.{self._fn.__name__} (and module {self._module})>"


def stage_of(module: str) -> Callable[[Callable], Stage]:
    """Decorator: the API function that stands for `module` as well."""
    return lambda fn: Stage(fn, module)


class Package(types.ModuleType):
    """The `pipeline` package's type: importing a stage's submodule leaves its Stage in place."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and isinstance(self.__dict__.get(name), Stage):
            return  # the Stage stands for this module already; the module stays in sys.modules
        super().__setattr__(name, value)
