"""One generic name -> factory registry.

Every pluggable component (dataset, partition, model, strategy) lives in a
:class:`Registry`. The registry key, the file stem of the module that defines
the component and the ``name:`` of its YAML file under ``configs/`` are the
same string; ``tests/test_configs.py`` enforces it.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fedsim.exceptions import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A mapping from names to factories that build ``T``.

    Parameters
    ----------
    kind : str
        What the registry holds ("model", "dataset", ...); used in error messages.

    Examples
    --------
    >>> MODELS: Registry[object] = Registry("model")
    >>> @MODELS.register("tiny")
    ... def tiny(*, width: int = 2) -> object:
    ...     return ("tiny", width)
    >>> MODELS.build("tiny", width=3)
    ('tiny', 3)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering a factory under ``name``; duplicates are refused."""

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``.

        Raises
        ------
        ConfigError
            If ``name`` is not registered; the message lists the choices.
        """
        try:
            return self._factories[name]
        except KeyError:
            hint = difflib.get_close_matches(str(name), self._factories, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{maybe}; choose one of: "
                f"{', '.join(self.names())}"
            ) from None

    def build(self, name: str, /, **kwargs: Any) -> T:
        """Build the component ``name`` with keyword arguments ``kwargs``.

        Unknown keyword arguments are reported in one sentence that lists the
        accepted ones, instead of a ``TypeError`` from deep inside the factory.
        """
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} {name!r}")
        return factory(**kwargs)


@functools.lru_cache(maxsize=1024)
def _keywords(fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """The keyword arguments ``fn`` accepts (``None``: any). Cached: a client
    builds its task and model every round, and ``inspect.signature`` costs
    tens of microseconds a call."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return tuple(
        n
        for n, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Raise :class:`ConfigError` if ``fn`` does not accept every key of ``kwargs``."""
    try:
        accepted = _keywords(fn)
    except TypeError:  # an unhashable callable: not cached
        accepted = _keywords.__wrapped__(fn)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{what} has no option {unknown[0]!r}; its options are: "
            f"{', '.join(accepted) or '(none)'}"
        )
