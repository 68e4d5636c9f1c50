"""Modules compiled in place (`module.compile()`: regional compilation, one block at a time), timed around their call.

`module.compile()` makes the module's `__call__` run `torch.compile(module._call_impl)`: its forward hooks, the
tracker's among them, are traced into the compiled code, where the tracker's hooks do nothing
(`torch.compiler.is_compiling()`), and its submodules run inside it. Timed by hooks alone, such a block and
everything in it vanished from the step: their time was the parent's self time, and a slow block was told as its
parent. Here the module's compiled callable is replaced by one that runs the tracker's enter and exit around it, in
eager code: the block is timed as one module, forward and backward (its submodules are fused into it and not timed
apart, as under `torch.compile(model)`). `torch.compile(module)`, an OptimizedModule wrapper, needs none of this:
the wrapper's own hooks run outside the compiled code. Closing the tracker puts the compiled callables back.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

_MARK = "_modtrack_compiled"  # on our callable: the compiled one it runs


class CompiledCalls:
    """The in-place compiled modules the tracker met, each with the compiled callable it had."""

    def __init__(self, enter: Callable, exit_: Callable) -> None:
        self._enter, self._exit = enter, exit_
        self.wrapped: dict[int, tuple[weakref.ref, Callable]] = {}

    def wrap(self, mod, site: tuple) -> None:
        compiled = mod.__dict__.get("_compiled_call_impl")
        if compiled is None or getattr(compiled, _MARK, None) is not None:
            return
        enter, exit_, module = self._enter, self._exit, weakref.ref(mod)  # no cycle through the module

        def timed(*args, **kwargs):
            mod = module()
            changed = None if mod is None else enter(site, mod, args, kwargs)
            if changed is not None:
                args, kwargs = changed
            output = None
            try:
                output = compiled(*args, **kwargs)
                return output
            finally:
                if mod is not None:
                    exit_(site, mod, args, output)

        setattr(timed, _MARK, compiled)
        mod._compiled_call_impl = timed
        self.wrapped[id(mod)] = (module, compiled)

    def forget(self, key: int) -> None:
        self.wrapped.pop(key, None)

    def unwrap_all(self) -> None:
        for module, compiled in self.wrapped.values():
            mod = module()
            if mod is not None and getattr(mod.__dict__.get("_compiled_call_impl"), _MARK, None) is compiled:
                mod._compiled_call_impl = compiled
        self.wrapped.clear()
