"""Let a subpackage be called like its main function: `souplm.learn(cfg)`, `souplm.evaluate(model, tasks)`.

`souplm.learn` must stay a package (its modules import as `souplm.learn.trainer`), and Python rebinds a
package attribute to the submodule on import, so a plain function export would be overwritten. Giving
the module object a `__call__` keeps both: the package, and the one-call API the notebook user expects.
"""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, function_name: str) -> None:
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = _CallableModule
