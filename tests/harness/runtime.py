"""ComfyUI in this process: the real node registry, validator and executor, on the CPU.

Two steps, because their order against other imports matters:

1. ``prepare()`` (cheap; ``tests/conftest.py`` calls it at import time, before test modules are
   collected and can import ``comfy.*``): puts ``COMFYUI_PATH`` first on ``sys.path``, sets
   ``args.cpu = True`` (read once, when ``comfy.model_management`` is first imported) and
   ``args.base_directory`` to a fresh per-session temp directory (read once, when ``folder_paths`` is
   first imported).
2. ``boot()`` (a few seconds): imports ``utils.extra_config`` before ComfyUI's ``nodes`` (``nodes.py``
   puts ``comfy/`` first on ``sys.path`` and ``comfy/utils.py`` would then hide ComfyUI's ``utils/``
   package), points every folder at the base directory through ``folder_paths``' setters, installs a
   stub ``server.PromptServer.instance``, hooks progress bars the way ``main.py`` does (the hook is
   what makes ``ProgressBar.update`` a cancellation point), links this repository as
   ``custom_nodes/ComfyUI-Personalize`` and runs ``nodes.init_extra_nodes(init_custom_nodes=True,
   init_api_nodes=...)``, so the pack is imported exactly the way ComfyUI imports it.

Then ``ComfyRuntime.run_prompt(prompt)`` validates an API-format graph with
``execution.validate_prompt`` and runs it with one long-lived ``execution.PromptExecutor`` (node
outputs are cached between prompts, as in the server; ``reset_cache()`` clears them).
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from . import (
    PACK_DIR_NAME,
    PromptExecutionError,
    PromptInterrupted,
    PromptValidationError,
    execution_error_message,
    find_comfyui,
    image_paths,
    install_model,
    link_pack,
    make_base_dir,
    validation_error_message,
)

_prepared: dict = {}
_runtime: ComfyRuntime | None = None
_boot_lock = threading.Lock()


def prepare(base_dir=None) -> Path:
    """Set up sys.path and ComfyUI's args before any ``comfy`` import; return the base directory.

    Idempotent. Raises if ``comfy.model_management`` was imported already and chose a GPU. If
    ``folder_paths`` was imported already (too late for ``args.base_directory``), ``boot()`` re-points
    its folders through its setters instead.
    """
    if _prepared:
        return _prepared["base_dir"]
    comfy_path = find_comfyui()
    # First on sys.path: this repository has nodes/ and trainers/ packages, and `python -m pytest`
    # puts the working directory on sys.path; ComfyUI's nodes.py must win `import nodes`.
    if str(comfy_path) in sys.path:
        sys.path.remove(str(comfy_path))
    sys.path.insert(0, str(comfy_path))

    if base_dir is None:
        base_dir = Path(tempfile.mkdtemp(prefix="personalize-runtime-"))
        if not os.environ.get("PERSONALIZE_KEEP_TMP"):
            atexit.register(shutil.rmtree, base_dir, True)
    base_dir = make_base_dir(Path(base_dir).resolve())

    if "comfy.model_management" in sys.modules:
        import comfy.model_management as mm

        if mm.get_torch_device().type != "cpu":
            raise RuntimeError("comfy.model_management was imported before harness.runtime.prepare(): "
                               "it chose a GPU; import the harness first.")
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base_dir)
    _prepared.update(base_dir=base_dir, comfy_path=comfy_path)
    return base_dir


class StubPromptServer:
    """What nodes and the executor use of ``server.PromptServer.instance``, recording events.

    ``events`` is a list of ``{"type": event, "data": data, "sid": sid, "t": time}``, in order.
    """

    def __init__(self):
        from aiohttp import web

        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.routes = web.RouteTableDef()
        self.app = web.Application()
        self.sockets = {}
        self.sockets_metadata = {}
        self.supports = ["custom_nodes_from_web"]
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.loop = None

    def send_sync(self, event, data, sid=None):
        with self._lock:
            self.events.append({"type": event, "data": data, "sid": sid, "t": time.time()})

    async def send(self, event, data, sid=None):
        self.send_sync(event, data, sid)

    async def send_json(self, event, data, sid=None):
        self.send_sync(event, data, sid)

    def send_progress_text(self, text, node_id, sid=None):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.send_sync("progress_text", {"node": str(node_id), "text": text}, sid)

    def queue_updated(self):
        pass


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self.records.append(self.format(record))
        except Exception:  # never let logging break a test
            pass


def _install_progress_hook(stub: StubPromptServer) -> None:
    """What main.py's hijack_progress does: progress events, progress state, the interrupt check."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if prompt_id is None:
            prompt_id = stub.last_prompt_id
        if node_id is None:
            node_id = stub.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        stub.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                       stub.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


class ComfyRuntime:
    """The booted in-process ComfyUI. Use the ``comfy_runtime`` fixture rather than building one."""

    def __init__(self, base_dir: Path, init_api_nodes: bool):
        self.base_dir = base_dir
        self.comfy_path: Path = _prepared["comfy_path"]
        self.client_id = "personalize-tests"
        self._log = _ListHandler()
        root = logging.getLogger()
        root.addHandler(self._log)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)  # ComfyUI logs at INFO (main.py's setup_logger does this)

        t0 = time.perf_counter()
        import utils.extra_config  # noqa: F401  (before `nodes`: see module docstring)
        import folder_paths

        self._point_folders(folder_paths)
        # Something collected since prepare() may have put this repository (with its own nodes/ package)
        # ahead of ComfyUI on sys.path: ComfyUI's nodes.py must win `import nodes`.
        if str(self.comfy_path) in sys.path:
            sys.path.remove(str(self.comfy_path))
        sys.path.insert(0, str(self.comfy_path))
        import server

        self.stub = StubPromptServer()
        server.PromptServer.instance = self.stub
        import nodes
        import execution
        import hook_breaker_ac10a0

        if Path(nodes.__file__).resolve().parent != self.comfy_path:
            raise RuntimeError(f"`import nodes` found {nodes.__file__}, not ComfyUI's nodes.py")
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        _install_progress_hook(self.stub)

        link_pack(base_dir)
        mark = self.log_mark()
        hook_breaker_ac10a0.save_functions()
        try:
            self.import_failed = asyncio.run(
                nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=init_api_nodes))
        finally:
            hook_breaker_ac10a0.restore_functions()
        self.init_log = self.log_since(mark)
        self.boot_seconds = time.perf_counter() - t0

        self.executor = execution.PromptExecutor(self.stub, cache_type=execution.CacheType.CLASSIC)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="comfy-prompt")
        self._run_lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------
    def _point_folders(self, folder_paths) -> None:
        base = self.base_dir
        folder_paths.set_output_directory(str(base / "output"))
        folder_paths.set_input_directory(str(base / "input"))
        folder_paths.set_temp_directory(str(base / "temp"))
        folder_paths.set_user_directory(str(base / "user"))
        models = base / "models"
        for name in list(folder_paths.folder_names_and_paths):
            if name == "custom_nodes":
                continue
            paths = folder_paths.get_folder_paths(name)
            if paths and Path(paths[0]).parent.resolve() == models.resolve():
                continue  # already under our base (args.base_directory was read in time)
            # folder_paths was imported before prepare(): put ours first (saves go to [0]).
            folder_paths.add_model_folder_path(name, str(models / Path(paths[0]).name if paths else models / name),
                                               is_default=True)
        # custom_nodes: only ours, so no other pack in a ComfyUI checkout is loaded.
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(base / "custom_nodes")], set())

    # -- the pack ---------------------------------------------------------------------------
    @property
    def pack_dir(self) -> Path:
        return self.base_dir / "custom_nodes" / PACK_DIR_NAME

    @property
    def pack_loaded(self) -> bool:
        return PACK_DIR_NAME in self.nodes.LOADED_MODULE_DIRS

    @property
    def pack_module(self):
        """The pack's package as ComfyUI imported it (``sys.modules`` key is the path, '.' -> '_x_')."""
        return sys.modules.get(str(self.pack_dir).replace(".", "_x_"))

    def pack_import(self, name: str):
        """A submodule of the pack as ComfyUI loaded it, e.g. ``pack_import("trainers.loop")``
        (the same module objects the pack's nodes use; ``import trainers`` would be a second copy)."""
        import importlib

        if self.pack_module is None:
            raise AssertionError(f"{PACK_DIR_NAME} is not loaded:\n{self.init_log}")
        return importlib.import_module(f"{self.pack_module.__name__}.{name}")

    def assert_pack_loaded(self) -> None:
        if not self.pack_loaded or "IMPORT FAILED" in self._import_line():
            raise AssertionError(f"{PACK_DIR_NAME} did not load as a custom node:\n{self.init_log}")

    def _import_line(self) -> str:
        return "\n".join(line for line in self.init_log.splitlines() if PACK_DIR_NAME in line)

    def pack_node_ids(self) -> list[str]:
        """Node ids registered from the pack (``RELATIVE_PYTHON_MODULE`` names it)."""
        tag = f"custom_nodes.{PACK_DIR_NAME}"
        return sorted(k for k, v in self.nodes.NODE_CLASS_MAPPINGS.items()
                      if getattr(v, "RELATIVE_PYTHON_MODULE", None) == tag)

    # -- folders ----------------------------------------------------------------------------
    def folder(self, kind: str) -> Path:
        """Where ComfyUI saves ``kind`` ("loras", "checkpoints", ...; "input"/"output"/"temp")."""
        if kind in ("input", "output", "temp"):
            return Path(self.folder_paths.get_directory_by_type(kind))
        return Path(self.folder_paths.get_folder_paths(kind)[0])

    def install_model(self, kind: str, source, name: str | None = None) -> str:
        return install_model(self.base_dir, kind, source, name)

    def image_paths(self, result: dict, node_id: str | None = None) -> list[Path]:
        return image_paths(result, self.base_dir, node_id)

    # -- running ----------------------------------------------------------------------------
    def run_prompt(self, prompt: dict, *, client_id: str | None = "default", prompt_id: str | None = None,
                   check: bool = True) -> dict:
        """Validate and execute an API-format graph; return a /history-like entry.

        ``client_id``: "default" is the runtime's ``client_id``; ``None`` runs it like a prompt
        queued without one (the executor then sends its own messages to nobody).

        Returns ``{"prompt_id", "outputs": {node_id: ui dict}, "meta", "status": {"status_str",
        "completed", "messages"}, "events": [events of this run]}``. With ``check`` (default) raises
        ``PromptValidationError`` / ``PromptExecutionError`` (its message holds the node's
        exception and traceback) / ``PromptInterrupted`` instead of returning a failed run.
        """
        if client_id == "default":
            client_id = self.client_id
        prompt_id = prompt_id or str(uuid.uuid4())
        with self._run_lock:
            valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
            # The server queues a graph when any output validates and drops the others; a test (or the
            # quality benchmark) wants to hear of every node that did not.
            if not valid or (check and node_errors):
                raise PromptValidationError(validation_error_message(error, node_errors),
                                            {"error": error, "node_errors": node_errors})
            first_event = len(self.stub.events)
            self.stub.last_prompt_id = prompt_id
            extra = {"client_id": client_id} if client_id is not None else {}
            t0 = time.perf_counter()
            self.executor.execute(prompt, prompt_id, extra, outputs)
            if self.stub.client_id is not None:  # what the server's prompt worker sends last
                self.stub.send_sync("executing", {"node": None, "prompt_id": prompt_id}, self.stub.client_id)
            messages = list(self.executor.status_messages)
            result = {
                "prompt_id": prompt_id,
                "outputs": dict(self.executor.history_result.get("outputs", {})),
                "meta": dict(self.executor.history_result.get("meta", {})),
                "status": {
                    "status_str": "success" if self.executor.success else "error",
                    "completed": self.executor.success,
                    "messages": messages,
                },
                "events": self.stub.events[first_event:],
                "seconds": time.perf_counter() - t0,
            }
        if check:
            for event, data in messages:
                if event == "execution_error":
                    raise PromptExecutionError(execution_error_message(data), data)
                if event == "execution_interrupted":
                    where = f"{data.get('node_id')} ({data.get('node_type')})"
                    raise PromptInterrupted(f"interrupted at node {where}", data)
            if not self.executor.success:
                raise PromptExecutionError(f"prompt {prompt_id} failed: {messages}", {})
        return result

    def submit(self, prompt: dict, **kwargs) -> concurrent.futures.Future:
        """``run_prompt`` on a worker thread (e.g. to ``interrupt()`` it); returns a Future."""
        return self._pool.submit(self.run_prompt, prompt, **kwargs)

    def interrupt(self) -> None:
        """What ``POST /interrupt`` does: flag the running prompt to stop at its next check."""
        self.nodes.interrupt_processing(True)

    def reset_cache(self) -> None:
        """Forget cached node outputs (the server does this on ``POST /free``)."""
        self.executor.reset()

    def unload_models(self) -> None:
        import comfy.model_management

        comfy.model_management.unload_all_models()

    # -- events and log -----------------------------------------------------------------------
    @property
    def events(self) -> list[dict]:
        return self.stub.events

    def events_for(self, prompt_id: str, event_type: str | None = None) -> list[dict]:
        out = []
        for e in self.stub.events:
            data = e["data"]
            if isinstance(data, dict) and data.get("prompt_id") == prompt_id:
                if event_type is None or e["type"] == event_type:
                    out.append(e)
        return out

    def log_text(self) -> str:
        return "\n".join(self._log.records)

    def log_mark(self) -> int:
        return len(self._log.records)

    def log_since(self, mark: int) -> str:
        return "\n".join(self._log.records[mark:])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        logging.getLogger().removeHandler(self._log)


def boot(init_api_nodes: bool = False) -> ComfyRuntime:
    """The process-wide runtime (booted once; ComfyUI's registries are global).

    ``init_api_nodes`` False skips ComfyUI's paid-API nodes (``comfy_api_nodes``), which only slow
    the start; custom nodes load the same either way.
    """
    global _runtime
    with _boot_lock:
        if _runtime is None:
            base = prepare()
            _runtime = ComfyRuntime(base, init_api_nodes=init_api_nodes)
        return _runtime
