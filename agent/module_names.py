"""Module names, as the seed ModuleTracker gives them, with wrapper levels stripped.

The seed names a module by the class of the first module called (the root) and the attribute
path below it (`Net.blocks.1.mlp`). Wrappers (DDP, DataParallel, FSDP, checkpoint wrappers,
torch.compile) add a level that differs between ranks and set-ups, so here a wrapper's inner module
takes the wrapper's own name: DDP(Net) and Net both give `Net.blocks.1.mlp` on every rank.

Names are interned: `names[i]` is the name of module id i, append-only, so the transport can send
the table once and then only what is new.
"""

from __future__ import annotations

import weakref

from torch import nn

# Attributes through which a wrapper holds the module it wraps.
WRAPPED_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)

_FSDPModule: type | None
try:  # FSDP2's fully_shard() turns class Net into FSDPNet(FSDPModule, Net)
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:
    _FSDPModule = None

# Module id of a wrapper whose forward only calls its inner module: not timed, not in `parents`.
SKIP = -1


def wrapped_child(mod: nn.Module) -> nn.Module | None:
    """The module that `mod` wraps, or None when `mod` is not a wrapper."""
    if isinstance(mod, _DATA_PARALLEL):
        return mod.module
    children = mod.__dict__.get("_modules", {})
    for attr in WRAPPED_ATTRS:
        inner = children.get(attr)
        if inner is not None:
            return inner
    return None


def class_name(mod: nn.Module) -> str:
    """The class name of the innermost wrapped module (FSDP2 `FSDPNet` reads as `Net`)."""
    inner = wrapped_child(mod)
    while inner is not None:
        mod, inner = inner, wrapped_child(inner)
    cls = type(mod)
    if _FSDPModule is not None and isinstance(mod, _FSDPModule) and len(cls.__bases__) > 1:
        return cls.__bases__[1].__name__
    return cls.__name__


class ModuleNames:
    """Gives every module called a stable id; `names` is the append-only id -> name table."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._ids_by_name: dict[str, int] = {}
        self._known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> name
        self._seen: weakref.WeakSet = weakref.WeakSet()  # modules whose children got names
        self._id_by_module: dict[int, int] = {}  # id(module) -> module id; the hooks' fast path
        self._refs: dict[int, weakref.ref] = {}  # drop a module's entry when it dies

    def module_id(self, mod: nn.Module) -> int:
        """The id of `mod` (SKIP for a pure wrapper). The hooks call this for every module call."""
        mid = self._id_by_module.get(id(mod))
        if mid is None:
            self._learn(mod)
            mid = self._id_by_module[id(mod)]
        return mid

    def intern(self, name: str) -> int:
        mid = self._ids_by_name.get(name)
        if mid is None:
            mid = self._ids_by_name[name] = len(self.names)
            self.names.append(name)
        return mid

    def _learn(self, mod: nn.Module) -> None:
        """The seed's naming walk, plus wrapper stripping; refreshes the fast path for all it renames."""
        touched: list[nn.Module] = []
        self._name(mod, touched)
        for m in touched:
            self._remember(m)

    def _name(self, mod: nn.Module, touched: list) -> str:
        if mod not in self._known:
            self._known[mod] = class_name(mod)
            touched.append(mod)
        name = self._known[mod]
        if mod not in self._seen:
            self._seen.add(mod)
            inner = wrapped_child(mod)
            for attr, sub in mod.named_children():
                self._known[sub] = name if sub is inner else f"{name}.{attr}"
                touched.append(sub)
                self._name(sub, touched)
        return name

    def _remember(self, mod: nn.Module) -> None:
        key = id(mod)
        # torch.compile's wrapper is timed (its inner modules run inside compiled code); others are not.
        is_pure_wrapper = wrapped_child(mod) is not None and not hasattr(mod, "_orig_mod")
        self._id_by_module[key] = SKIP if is_pure_wrapper else self.intern(self._known[mod])
        if key not in self._refs:
            by_module, refs = self._id_by_module, self._refs

            def forget(_ref, key=key):
                by_module.pop(key, None)
                refs.pop(key, None)

            self._refs[key] = weakref.ref(mod, forget)
