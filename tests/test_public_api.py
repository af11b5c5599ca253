"""The public surface of the package: exactly these names, all resolvable, everything else
private, and one exception hierarchy."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import shmcast

EXPECTED_ALL = {
    "AttachError",
    "BackoffWait",
    "BroadcastQueue",
    "FutexWait",
    "GatherQueue",
    "Handle",
    "IdleWait",
    "InheritedEndpoint",
    "MessageKindError",
    "MessageTooLarge",
    "PickleSerializer",
    "QueueBroken",
    "QueueClosed",
    "QueueStats",
    "QueueTimeout",
    "RemoteOptions",
    "RoleError",
    "SegmentError",
    "SerializationError",
    "Serializer",
    "SharedBuffers",
    "SharedMemoryFull",
    "ShmcastError",
    "SpinWait",
    "WaitPolicy",
    "__version__",
}

#: The public modules besides the package itself: the drop-ins for other projects' queues.
PUBLIC_MODULES = {"shmcast.compat", "shmcast.compat.vllm"}
COMPAT_VLLM_ALL = {
    "Handle",
    "MessageQueue",
    "VllmVersionError",
    "install",
    "installed",
    "plugin",
    "uninstall",
}

ERRORS = [
    "AttachError",
    "InheritedEndpoint",
    "MessageKindError",
    "MessageTooLarge",
    "QueueBroken",
    "QueueClosed",
    "QueueTimeout",
    "RoleError",
    "SegmentError",
    "SerializationError",
    "SharedMemoryFull",
]


def test_all_is_exactly_the_public_set() -> None:
    assert len(shmcast.__all__) == len(set(shmcast.__all__)), "duplicates in __all__"
    assert set(shmcast.__all__) == EXPECTED_ALL


def test_every_name_resolves() -> None:
    for name in shmcast.__all__:
        assert getattr(shmcast, name) is not None, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from shmcast import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == EXPECTED_ALL


def test_no_other_public_attributes() -> None:
    # A public subpackage is an attribute of the package once something imported it.
    subpackages = {name.split(".")[1] for name in PUBLIC_MODULES}
    public = {name for name in dir(shmcast) if not name.startswith("_")} - subpackages
    assert public == EXPECTED_ALL - {"__version__"}


def test_version() -> None:
    assert isinstance(shmcast.__version__, str)
    parts = shmcast.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


def test_every_implementation_module_is_private() -> None:
    modules = list(pkgutil.walk_packages(shmcast.__path__, prefix="shmcast."))
    assert modules, "no modules found"
    for module in modules:
        if module.name in PUBLIC_MODULES:
            continue
        # Modules inside a private subpackage (shmcast._tools.bench.x) are private through it; the
        # compat package's implementation modules are private by their own names.
        parts = module.name.split(".")
        private = parts[1].startswith("_") or (parts[1] == "compat" and parts[2].startswith("_"))
        assert private, f"{module.name} is a public module"
    assert {m.name for m in modules} >= {
        "shmcast._native",
        "shmcast._queue",
        "shmcast._ring",
        "shmcast._layout",
        "shmcast._segment",
        "shmcast._serialize",
        "shmcast._wait",
        "shmcast._errors",
        "shmcast._liveness",
    }


def test_the_queues_import_nothing_from_the_tools() -> None:
    """The layers: the core and the endpoints (the modules at the package's top level), the
    transports and the adapters for others' APIs import nothing from ``shmcast._tools`` (the
    command line, demo, stress, bench, inspection); only ``python -m shmcast`` starts the
    command line."""
    import ast
    from pathlib import Path

    root = Path(shmcast.__file__).parent
    layers = [*root.glob("*.py"), *(root / "_remote").glob("*.py"), *(root / "compat").glob("*.py")]
    offenders = []
    for path in layers:
        if path.name == "__main__.py":  # the command line's entry point
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any("_tools" in name.split(".") for name in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert len(layers) > 10 and not offenders, offenders


def test_public_objects_live_in_private_modules_and_are_documented() -> None:
    for name in EXPECTED_ALL - {"__version__"}:
        obj = getattr(shmcast, name)
        module = obj.__module__
        assert module.startswith("shmcast._"), f"{name} is defined in {module}"
        importlib.import_module(module)
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_exceptions_hierarchy() -> None:
    base = shmcast.ShmcastError
    assert issubclass(base, Exception)
    for name in ERRORS:
        assert issubclass(getattr(shmcast, name), base), name
    assert issubclass(shmcast.QueueTimeout, TimeoutError)
    assert issubclass(shmcast.AttachError, ValueError)
    assert issubclass(shmcast.MessageTooLarge, ValueError)
    assert issubclass(shmcast.MessageKindError, TypeError)
    assert issubclass(shmcast.InheritedEndpoint, RuntimeError)  # as a busy endpoint's error
    assert issubclass(shmcast.SharedMemoryFull, OSError)
    # The others are plain ShmcastErrors, not also built-in categories they are not.
    for name in ("QueueClosed", "QueueBroken", "SegmentError", "RoleError", "SerializationError"):
        assert not issubclass(getattr(shmcast, name), (ValueError, TypeError, TimeoutError)), name


def test_every_error_is_exported() -> None:
    defined = {
        name
        for name, obj in vars(shmcast._errors).items()
        if inspect.isclass(obj) and issubclass(obj, shmcast.ShmcastError)
    }
    assert defined == set(ERRORS) | {"ShmcastError"}


def test_queue_broken_carries_the_peer() -> None:
    error = shmcast.QueueBroken("gone", peer="reader 3", pid=1234)
    assert (str(error), error.peer, error.pid) == ("gone", "reader 3", 1234)
    assert shmcast.QueueBroken("gone").peer == ""


@pytest.mark.parametrize("policy", ["FutexWait", "SpinWait", "BackoffWait", "IdleWait"])
def test_wait_policies_share_the_base_class(policy: str) -> None:
    assert issubclass(getattr(shmcast, policy), shmcast.WaitPolicy)


def test_queues_share_the_interface() -> None:
    for name in ("put", "put_bytes", "reserve", "get", "get_bytes", "view", "close", "stats",
                 "wait_until_ready", "handle", "attach"):  # fmt: skip
        assert hasattr(shmcast.BroadcastQueue, name), name
        assert hasattr(shmcast.GatherQueue, name), name


def test_compat_vllm_exports_exactly_its_names_and_documents_them() -> None:
    import shmcast.compat.vllm as compat

    assert set(compat.__all__) == COMPAT_VLLM_ALL
    assert {n for n in dir(compat) if not n.startswith("_")} == COMPAT_VLLM_ALL
    for name in COMPAT_VLLM_ALL:
        obj = getattr(compat, name)
        where = obj.__module__
        assert where.startswith("shmcast.compat._"), f"{name} is defined in {where}"
        assert inspect.getdoc(obj), f"{name} has no docstring"
