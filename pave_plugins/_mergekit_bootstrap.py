"""Plugin discovery for mergekit: register merge methods from the ``mergekit.merge_methods`` entry points.

mergekit 0.1.5 has a registry (``mergekit.merge_methods.registry.register``) but no plugin
discovery. This module adds it without touching mergekit:

* ``pave_plugins_mergekit.pth`` (installed at the site-packages root) imports this module at
  interpreter start-up. All it does then is put a tiny finder at the front of ``sys.meta_path``
  that reacts to exactly one module name, ``mergekit.merge_methods`` (cost: a few microseconds;
  nothing else is imported, see ``benchmarks/bench_mergekit.py --startup``).
* When a program imports ``mergekit.merge_methods`` (``mergekit-yaml`` and every other mergekit
  entry point do), the finder lets the normal import run and then loads every entry point of the
  group ``mergekit.merge_methods``: each resolves to a ``MergeMethod``, an iterable of them, or a
  zero-argument callable returning one of those. Any installed package can register methods the
  same way::

      [project.entry-points."mergekit.merge_methods"]
      my_method = "my_package.mergekit:my_merge_method"

:func:`when_imported` is the same mechanism for other modules: the ``pave`` plugin uses it to wrap
mergekit's output writer (for its rank report) only once ``mergekit.io.tasks`` is imported.

Rules: a method whose name mergekit (or an earlier plugin) already has is *not* registered (a
warning says so: never a silent override); a plugin that fails to import is skipped with a
warning (mergekit keeps working); ``PAVE_PLUGINS_DISABLE=1`` turns the whole mechanism off
(neither the finder nor any plugin is installed).
"""

import os
import sys

ENV_DISABLE = "PAVE_PLUGINS_DISABLE"
ENTRY_POINT_GROUP = "mergekit.merge_methods"
_TARGET = "mergekit.merge_methods"
_LOADED_FLAG = "_entry_point_plugins_loaded"


def disabled() -> bool:
    """True when ``PAVE_PLUGINS_DISABLE`` is set to anything but ``''``, ``0``, ``false``, ``no``."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def _warn(message: str) -> None:
    import logging

    logging.getLogger("pave_plugins.mergekit").warning(message)


def _as_methods(obj):
    """Normalise an entry point's object to a list of merge methods."""
    from mergekit.merge_methods.base import MergeMethod

    if isinstance(obj, MergeMethod):
        return [obj]
    if callable(obj) and not isinstance(obj, type):
        obj = obj()
        if isinstance(obj, MergeMethod):
            return [obj]
    methods = list(obj)
    for m in methods:
        if not isinstance(m, MergeMethod):
            raise TypeError(f"expected mergekit MergeMethod objects, got {type(m).__name__}")
    return methods


def load_plugins() -> list:
    """Register the merge methods of all ``mergekit.merge_methods`` entry points (once per process).

    Returns the names registered by this call. Never raises: failures become warnings.
    """
    if disabled():
        return []
    try:
        from mergekit.merge_methods import registry
    except Exception as exc:  # mergekit itself broken: not ours to report
        _warn(f"mergekit plugins not loaded: cannot import mergekit.merge_methods.registry ({exc!r})")
        return []
    if getattr(registry, _LOADED_FLAG, False):
        return []
    setattr(registry, _LOADED_FLAG, True)
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:
        _warn(f"mergekit plugins not loaded: cannot read entry points ({exc!r})")
        return []
    return register_entry_points(eps, registry)


def register_entry_points(eps, registry) -> list:
    """Load each entry point and register its methods in ``registry``; returns the names registered.

    A failing entry point, a non-method object or a name clash gives a warning, never an error.
    """
    registered = []
    for ep in eps:
        try:
            methods = _as_methods(ep.load())
        except Exception as exc:
            _warn(
                f"mergekit plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        for method in methods:
            name = method.spec.name
            same_name = [m for m in registry.registered_methods() if m.spec.name == name]
            if same_name and same_name[0] is method:
                continue
            if same_name:
                _warn(
                    f"merge method {name!r} from plugin {ep.value} was not registered: "
                    "mergekit already has a method of that name (set a different name in the plugin)"
                )
                continue
            try:
                registry.register(method)
            except Exception as exc:
                _warn(f"merge method {name!r} from plugin {ep.value} could not be registered: {exc}")
                continue
            registered.append(name)
    return registered


_deferred: set = set()


def defer(name: str) -> None:
    """An entry point found its plugin module half-way through its import: that module will call
    :func:`register_late` for the method ``name`` when it has finished."""
    _deferred.add(name)


def register_late(method) -> None:
    """Register ``method`` if the plugins were loaded while its module was still importing.

    Happens when a program imports a plugin module before mergekit: that import pulls in
    ``mergekit.merge_methods``, whose plugin loading finds the plugin module half-initialised (its
    entry point then yields nothing). Same rules as :func:`register_entry_points`: no override,
    respects the opt-out, never raises.
    """
    if disabled() or method.spec.name not in _deferred:
        return  # the normal entry-point loading registers it
    _deferred.discard(method.spec.name)
    registry = sys.modules.get("mergekit.merge_methods.registry")
    if registry is None:
        return
    try:
        existing = [m for m in registry.registered_methods() if m.spec.name == method.spec.name]
        if existing:
            if existing[0] is not method:
                _warn(
                    f"merge method {method.spec.name!r} was not registered: "
                    "mergekit already has a method of that name"
                )
            return
        registry.register(method)
    except Exception as exc:
        _warn(f"merge method {getattr(method.spec, 'name', method)!r} could not be registered: {exc}")


# module name -> callbacks to run right after that module has been imported
_post_import: dict = {}


def when_imported(module_name: str, callback) -> None:
    """Run ``callback(module)`` right after ``module_name`` is imported (now, if it already is).

    Lets a plugin attach to a mergekit module only when a program actually uses it, without
    importing it early. Callback errors become warnings.
    """
    module = sys.modules.get(module_name)
    if module is not None:
        _run_callbacks(module_name, module, [callback])
        return
    _post_import.setdefault(module_name, []).append(callback)
    _ensure_finder()


def _run_callbacks(name, module, callbacks) -> None:
    for cb in callbacks:
        try:
            cb(module)
        except Exception as exc:
            _warn(f"post-import hook for {name} failed: {type(exc).__name__}: {exc}")


class _LoaderProxy:
    """Delegates to the real loader and runs the post-import callbacks after the module executed."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # give the module its real loader back before anything else can look at it
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        callbacks = _post_import.pop(self._name, [])
        if not _post_import:
            _remove_finder()
        _run_callbacks(self._name, module, callbacks)


class _MergekitFinder:
    """A meta-path finder that only answers for the few module names that have post-import hooks."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _post_import:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _MergekitFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderProxy(spec.loader, fullname)
        return spec


def _ensure_finder() -> None:
    if not any(isinstance(f, _MergekitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MergekitFinder())


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MergekitFinder)]


def install() -> None:
    """Load the plugins when ``mergekit.merge_methods`` is imported (now, if it already is)."""
    if disabled():
        return
    when_imported(_TARGET, lambda _module: load_plugins())


install()
