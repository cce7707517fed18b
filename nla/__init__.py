"""nla: Natural Language Autoencoders for language-model activations.

`from nla import NLA` is the public entry point (`nla.api`); it is imported on first use so
that `import nla.config` and `nla --help` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nla.api import NLA

__all__ = ["NLA"]


def __getattr__(name: str) -> Any:
    if name == "NLA":
        from nla.api import NLA

        return NLA
    raise AttributeError(f"module 'nla' has no attribute {name!r}")
