"""flowkern.interop: the flows people already have, on flowkern's fused ops.

    import flowkern
    flow = flowkern.accelerate(flow)          # an nflows / zuko / normflows model, in place
    print(flowkern.interop.explain(flow))     # what was accelerated, what was not and why
    flowkern.accelerate(flow, enable=False)   # back to the library's own code

accelerate() walks the module tree and, for each module whose exact class it knows, swaps the
instance's class for a subclass whose forward and inverse run on flowkern.ops (the fused spline
and affine kernels). Parameters, buffers, state-dict keys, the module tree and isinstance()
are unchanged, so a model saved accelerated loads into a plain one and back. A module it does
not know, a user's own subclass of a known class or an option the kernels do not cover is left
as it is, and explain() says why. Each peer library has its own module (nflows.py, zuko.py, normflows.py);
a library that is not installed is simply not looked for.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Entry", "Report", "accelerate", "explain", "is_accelerated"]

# The peer modules, imported only when their library is: each registers its rules.
_PEERS = ("nflows", "zuko", "normflows")


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one class of a peer library is accelerated: `check(module)` returns None when the
    module is covered, else the reason it is not (no check: every option is covered);
    `accelerated` is the subclass swapped in."""

    original: type
    accelerated: type
    check: Optional[Callable[[torch.nn.Module], Optional[str]]]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str        # the module's name in the tree ("" for the root)
    cls: str         # its class, as module.qualname
    accelerated: bool
    why: str         # what runs it (accelerated) or why it was left as it is


@dataclasses.dataclass(frozen=True)
class Report:
    entries: Tuple[Entry, ...]

    @property
    def accelerated(self) -> List[Entry]:
        return [e for e in self.entries if e.accelerated]

    @property
    def left(self) -> List[Entry]:
        return [e for e in self.entries if not e.accelerated]

    def __str__(self) -> str:
        if not self.entries:
            return "flowkern.accelerate: no module of nflows, zuko or normflows found"
        lines = [f"flowkern.accelerate: {len(self.accelerated)} accelerated, {len(self.left)} left as they are"]
        for e in self.entries:
            mark = "+" if e.accelerated else "-"
            lines.append(f"  {mark} {e.name or '(root)'}: {e.cls}: {e.why}")
        return "\n".join(lines)


_RULES: Dict[type, Rule] = {}      # original class -> rule
_ORIGINAL: Dict[type, type] = {}   # accelerated subclass -> original class
_FAMILIES: List[Tuple[str, type, tuple]] = []  # (library, base class, containers not to report)


def register(original: type, accelerated: type,
             check: Optional[Callable[[torch.nn.Module], Optional[str]]] = None) -> None:
    _RULES[original] = Rule(original, accelerated, check)
    _ORIGINAL[accelerated] = original


def register_family(library: str, base: type, containers: tuple = ()) -> None:
    """Modules deriving from `base` that no rule knows are reported (a custom subclass, an
    unsupported transform) rather than passed over in silence; `containers` (a composite of
    transforms) are not reported themselves, only what they hold."""
    _FAMILIES.append((library, base, tuple(containers)))


_loaded = False


def _load_peers() -> None:
    global _loaded
    if _loaded:
        return
    for peer in _PEERS:
        try:
            importlib.import_module(peer)
        except ImportError:
            continue
        importlib.import_module(f"{__name__}.{peer}")
    _loaded = True


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _classify(module: torch.nn.Module) -> Optional[Tuple[Optional[Rule], str]]:
    """(rule or None, reason) for a module of a known family; None for any other module."""
    cls = type(module)
    original = _ORIGINAL.get(cls, cls)
    rule = _RULES.get(original)
    if rule is not None:
        why = rule.check(module) if rule.check is not None else None
        return (None, why) if why else (rule, "fused flowkern ops")
    for library, base, containers in _FAMILIES:
        if isinstance(module, base) and not isinstance(module, containers):
            known = [r.original for r in _RULES.values() if isinstance(module, r.original)]
            if known:
                return None, (f"a subclass of {_qualname(known[0])}: its own code may differ from the class "
                              "flowkern knows, so it is left as it is")
            return None, f"no fused version of this {library} transform (it runs as it is)"
    return None


def _walk(model: torch.nn.Module):
    for name, module in model.named_modules():
        found = _classify(module)
        if found is not None:
            yield name, module, found


def explain(model: torch.nn.Module) -> Report:
    """Which modules of `model` accelerate() runs on flowkern's ops and which it leaves, and why."""
    _load_peers()
    entries = []
    for name, module, (rule, why) in _walk(model):
        accelerated = type(module) in _ORIGINAL
        cls = _ORIGINAL.get(type(module), type(module))
        if accelerated:
            why = "fused flowkern ops"
        elif rule is not None:
            why = "can be accelerated (not now: flowkern.accelerate(model) to do it)"
        entries.append(Entry(name, _qualname(cls), accelerated, why))
    return Report(tuple(entries))


def accelerate(model: torch.nn.Module, *, enable: bool = True, inplace: bool = True,
               verbose: bool = False) -> torch.nn.Module:
    """Runs the transforms of `model` that flowkern knows (nflows, zuko, normflows) on its fused ops.

    Returns the model (a deep copy with inplace=False). enable=False undoes it: every
    accelerated module gets its library's own class back. verbose=True prints explain()'s
    report. The numbers are the library's own (tests/test_interop.py: float64 to 1e-12
    relative); see docs/interop.md for what is covered.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"accelerate takes an nn.Module, got {type(model).__name__}")
    if not isinstance(enable, bool) or not isinstance(inplace, bool):
        raise TypeError("enable and inplace must be bools")
    _load_peers()
    if not inplace:
        model = copy.deepcopy(model)
    for _, module, (rule, _why) in list(_walk(model)):
        cls = type(module)
        if enable and rule is not None and cls is rule.original:
            prepare = getattr(rule.accelerated, "_flowkern_prepare", None)
            if prepare is not None:
                prepare(module)  # before the swap: a failure leaves the module as it was
            module.__class__ = rule.accelerated
        elif not enable and cls in _ORIGINAL:
            release = getattr(cls, "_flowkern_release", None)
            if release is not None:
                release(module)
            module.__class__ = _ORIGINAL[cls]
    if verbose:
        print(explain(model))
    return model


def is_accelerated(module: torch.nn.Module) -> bool:
    return type(module) in _ORIGINAL
