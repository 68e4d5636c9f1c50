"""The tracker's forward hooks on each module, and sampled mode's way of taking them off between detailed steps.

A step without module detail (sampled mode) times only the calls at the top level. Measured on MLP-200
(401 modules, CPU): hooks left on that return after one attribute test still cost ~5 µs per call, because any
hook sends torch's `Module.__call__` down its slow path; taking them off (and the global hook that meets new
modules) lets every nested call run as if nothing tracked it, for ~2-4 ms per removal and re-registration of
every hook, paid twice per N steps. Modules called at the top level keep theirs: they give the step figures.
Hooks are added and removed only at a step boundary, on the training thread; torch iterates a copy of a
module's hooks, so a hook removed while its module runs is simply not called.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial


class ModuleHooks:
    """Each module's (pre, post) hook handles, switched off for nested modules while steps have no detail."""

    def __init__(self, enter: Callable, exit_: Callable) -> None:
        self._enter, self._exit = enter, exit_
        self.handles: dict[int, tuple] = {}  # id(module) -> (pre hook, post hook) handles
        self.removed: dict[int, weakref.ref] = {}  # modules whose hooks are off now
        self.roots: set[int] = set()  # id(module) of modules ever called at the top level: never taken off

    def add(self, mod, site: tuple) -> None:
        """Our pre hook first and our post hook last, so the module's own hooks run inside its window."""
        pre = mod.register_forward_pre_hook(partial(self._enter, site), prepend=True, with_kwargs=True)
        post = mod.register_forward_hook(partial(self._exit, site), always_call=True)
        site[2][0], site[2][1] = pre.id, post.id
        self.handles[id(mod)] = (pre, post)

    def forget(self, key: int) -> None:
        self.handles.pop(key, None)
        self.removed.pop(key, None)
        self.roots.discard(key)

    def take_off(self, hooked: dict) -> bool:
        """Off for every module never called at the top level; False (nothing done) while none is known."""
        if not self.roots:
            return False
        for key, (pre, post) in self.handles.items():
            if key not in self.roots and key in hooked:
                pre.remove()
                post.remove()
                self.removed[key] = hooked[key]
        return True

    def put_back(self, site_of: Callable) -> None:
        removed, self.removed = self.removed, {}
        for ref in removed.values():
            mod = ref()
            site = None if mod is None else site_of(mod)
            if site is not None:
                self.add(mod, site)

    def remove_all(self) -> None:
        for pre, post in self.handles.values():
            pre.remove()
            post.remove()
        self.handles.clear()
        self.removed.clear()
