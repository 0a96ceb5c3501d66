"""``bns comfyui install COMFYUI_DIR``: put the bns nodes into a ComfyUI checkout.

What goes into ``COMFYUI_DIR/custom_nodes/bns_nodes/`` is a shim: one ``__init__.py`` that
imports the nodes from the installed bns package. A copy of the node code would need bns
installed anyway (the nodes run bns's solvers), and would go stale at the next bns upgrade,
pairing old node code with a newer solver format; the shim always runs the nodes of the bns
that ComfyUI's Python imports, so upgrading bns there upgrades the nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..._io import atomic_write_text, make_folder
from .conventions import ComfyUIError

__all__ = ["install", "add_parser", "cmd_comfyui", "SHIM_MARKER"]

FOLDER = "bns_nodes"
SHIM_MARKER = "bns-comfyui-shim"
SHIM = f'''"""bns nodes for ComfyUI ({SHIM_MARKER}, written by `bns comfyui install`).

The nodes (BNS Sampler, BNS Sigmas) live in the installed bns package
(bns.integrations.comfyui), so upgrading bns upgrades them; the Python that runs ComfyUI must
have bns installed. Delete this folder to uninstall; `bns comfyui install` rewrites it.
"""

try:
    from bns.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:
    raise ImportError(
        f"bns_nodes: cannot import bns in ComfyUI's Python ({{e}}); install bns into the"
        " Python that runs ComfyUI"
    ) from e

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def _is_comfyui(root: Path) -> bool:
    return (root / "custom_nodes").is_dir() and (root / "comfy" / "samplers.py").is_file()


def _is_ours(target: Path) -> bool:
    """A folder this command wrote: our ``__init__.py`` and nothing else (but bytecode)."""
    if target.is_symlink() or not target.is_dir():
        return False
    names = {p.name for p in target.iterdir()}
    if not names <= {"__init__.py", "__pycache__"} or "__init__.py" not in names:
        return False
    try:
        return SHIM_MARKER in (target / "__init__.py").read_text(errors="replace")
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def install(comfyui_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write the shim package into ``comfyui_dir/custom_nodes/bns_nodes``; returns its path.

    Refuses a folder that is not a ComfyUI checkout (no ``custom_nodes`` folder or no
    ``comfy`` package) and, without ``force``, an existing ``bns_nodes`` that this command
    did not write. Our own folder is updated in place (its ``__init__.py`` replaced
    atomically); a new or forced one is built beside it under a name ComfyUI skips
    (``*.disabled``) and renamed into place.
    """
    root = Path(comfyui_dir).expanduser()
    if not _is_comfyui(root):
        raise ComfyUIError(
            f"{root} is not a ComfyUI checkout (it needs a custom_nodes folder and the comfy"
            " package)"
        )
    target = root / "custom_nodes" / FOLDER
    exists = target.exists() or target.is_symlink()
    if exists and _is_ours(target):
        atomic_write_text(target / "__init__.py", SHIM)
        return target
    if exists and not force:
        raise ComfyUIError(
            f"{target} exists and was not written by bns comfyui install; pass --force to"
            " replace it"
        )
    tag = f"{os.getpid()}.disabled"  # ComfyUI does not load folders named *.disabled
    fresh = target.with_name(f"{FOLDER}.new-{tag}")
    old = target.with_name(f"{FOLDER}.old-{tag}")
    for leftover in (fresh, old):
        if leftover.exists() or leftover.is_symlink():
            _remove(leftover)
    make_folder(fresh)
    try:
        atomic_write_text(fresh / "__init__.py", SHIM)
        if exists:
            os.replace(target, old)
        os.replace(fresh, target)
    except BaseException:
        if old.exists() and not (target.exists() or target.is_symlink()):
            os.replace(old, target)  # put the replaced folder back
        if fresh.exists():
            shutil.rmtree(fresh, ignore_errors=True)
        raise
    if exists:
        _remove(old)
    return target


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``bns comfyui install COMFYUI_DIR [--force]`` on the ``bns`` command line."""
    c = sub.add_parser("comfyui", help="ComfyUI nodes (BNS Sampler, BNS Sigmas)")
    actions = c.add_subparsers(dest="comfyui_command", required=True)
    i = actions.add_parser(
        "install",
        help="write custom_nodes/bns_nodes (a shim importing the installed bns) into a ComfyUI"
        " checkout",
    )
    i.add_argument("comfyui_dir", type=Path, metavar="COMFYUI_DIR", help="the ComfyUI folder")
    i.add_argument(
        "--force",
        action="store_true",
        help="replace an existing custom_nodes/bns_nodes that bns did not write",
    )


def cmd_comfyui(args: argparse.Namespace) -> int:
    target = install(args.comfyui_dir, force=args.force)
    print(
        f"bns nodes installed in {target}; restart ComfyUI. They import bns: the Python that"
        " runs ComfyUI must have bns installed."
    )
    return 0
