"""Reading robustbench's ``model_zoo/cifar10.py`` / ``cifar100.py`` with ``ast``, without importing them.

Importing robustbench takes seconds and pulls in timm/torchvision; parsing its zoo files gives the same
names, Google-Drive ids and constructors (and a leaderboard-style architecture label for each) at once.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from .entries import ZooEntry, _make_entry

# --------------------------------------------------------------------------------------------

_MISSING = object()


def _literal(node: ast.AST | None, env: dict[str, Any]) -> Any:
    """Value of a literal expression, resolving bare names through ``env``; ``_MISSING`` if not literal."""
    if node is None:
        return _MISSING
    if isinstance(node, ast.Name):
        return env.get(node.id, _MISSING)
    if isinstance(node, (ast.List, ast.Tuple)):
        vals = [_literal(e, env) for e in node.elts]
        return _MISSING if any(v is _MISSING for v in vals) else vals
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return _MISSING


def _func_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _resnet_depth(block: str, num_blocks: Any) -> int | None:
    if not isinstance(num_blocks, list) or not all(isinstance(n, int) for n in num_blocks):
        return None
    per_block = 3 if "bottleneck" in block.lower() else 2
    return per_block * sum(num_blocks) + 2


def _describe_call(func: str, args: list[ast.AST], kwargs: dict[str, ast.AST], env: dict[str, Any]) -> str | None:
    """A leaderboard-style architecture label for a known robustbench constructor call."""

    def arg(pos: int | None, name: str, default: Any) -> Any:
        if name in kwargs:
            v = _literal(kwargs[name], env)
        elif pos is not None and pos < len(args):
            v = _literal(args[pos], env)
        else:
            v = default
        return default if v is _MISSING else v

    if func == "WideResNet":
        # robustbench: WideResNet(depth=28, num_classes=10, widen_factor=10, sub_block1=False, ...)
        return f"WideResNet-{arg(0, 'depth', 28)}-{arg(2, 'widen_factor', 10)}"
    if func == "DMWideResNet":
        return f"WideResNet-{arg(None, 'depth', 28)}-{arg(None, 'width', 10)}"
    if func == "DMPreActResNet":
        return f"PreActResNet-{arg(None, 'depth', 18)}"
    if func in ("ResNet", "PreActResNet") and args:
        depth = _resnet_depth(_func_name(args[0]), _literal(args[1], env) if len(args) > 1 else _MISSING)
        if depth:
            return f"{func}-{depth}"
    if func in ("ResNet18", "ResNet34", "ResNet50", "PreActResNet18"):
        return f"{func[:-2]}-{func[-2:]}"
    if func.startswith("ResNest"):
        return f"ResNeSt-{func[len('ResNest'):]}"
    return None


def _class_arch(cls: ast.ClassDef) -> str | None:
    """Architecture of a wrapper class ``class X(Base): def __init__(...): super().__init__(...)``."""
    base = _func_name(cls.bases[0]) if cls.bases else ""
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return None
    env: dict[str, Any] = {}
    a = init.args
    positional = a.posonlyargs + a.args
    for argnode, default in zip(positional[len(positional) - len(a.defaults):], a.defaults):
        env[argnode.arg] = _literal(default, {})
    for argnode, default in zip(a.kwonlyargs, a.kw_defaults):
        if default is not None:
            env[argnode.arg] = _literal(default, {})
    for node in ast.walk(init):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and isinstance(node.func.value, ast.Call) and _func_name(node.func.value.func) == "super"):
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            return _describe_call(base, list(node.args), kwargs, env)
    return None


def _describe_ctor(node: ast.AST, classes: dict[str, ast.ClassDef]) -> str:
    """Readable architecture for the ``'model'`` value of a zoo entry (a lambda or a class name)."""
    body = node.body if isinstance(node, ast.Lambda) else node
    label = None
    if isinstance(body, ast.Call):
        kwargs = {k.arg: k.value for k in body.keywords if k.arg}
        label = _describe_call(_func_name(body.func), list(body.args), kwargs, {})
    elif isinstance(body, (ast.Name, ast.Attribute)):
        name = _func_name(body)
        if name in classes:
            label = _class_arch(classes[name])
        label = label or _describe_call(name, [], {}, {}) or name
    if label:
        return label
    text = ast.unparse(body)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_zoo_file(path: Path, dataset: str) -> dict[str, list[ZooEntry]]:
    """Entries of the module-level ``linf`` / ``l2`` OrderedDict literals of one zoo file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, list[ZooEntry]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        threat = {"linf": "Linf", "l2": "L2"}.get(node.targets[0].id)
        call = node.value
        if threat is None or not (isinstance(call, ast.Call) and _func_name(call.func) == "OrderedDict" and call.args):
            continue
        items = call.args[0]
        if not isinstance(items, (ast.List, ast.Tuple)):
            continue
        entries = []
        for item in items.elts:
            if not (isinstance(item, ast.Tuple) and len(item.elts) == 2):
                continue
            name_node, spec = item.elts
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                continue
            fields: dict[str, ast.AST] = {}
            if isinstance(spec, ast.Dict):  # a repeated key keeps its last value, as in Python
                fields = {k.value: v for k, v in zip(spec.keys, spec.values)
                          if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            gid = _literal(fields.get("gdrive_id"), {})
            if isinstance(gid, list) and all(isinstance(g, str) for g in gid):
                gid = tuple(gid)
            elif not (gid is None or isinstance(gid, str)):
                gid = None  # not a literal; load_model will still know it
            model_node = fields.get("model")
            arch = _describe_ctor(model_node, classes) if model_node is not None else "unknown"
            ctor = ast.unparse(model_node.body if isinstance(model_node, ast.Lambda) else model_node) \
                if model_node is not None else None
            entries.append(_make_entry(name_node.value, dataset, threat, arch, gid, ctor))
        out[threat] = entries
    return out
