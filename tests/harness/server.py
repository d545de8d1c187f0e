"""A real ComfyUI HTTP server in a subprocess, and a client for it.

``ComfyServer.start(base_dir)`` runs ``python main.py --cpu --listen 127.0.0.1 --port <free>
--base-directory <base_dir>`` (ComfyUI v0.3.64 flag names) with this repository linked as
``<base_dir>/custom_nodes/ComfyUI-Personalize``, its stdout+stderr going to ``<base_dir>/server.log``,
and waits until ``GET /object_info`` answers. A background thread keeps one ``/ws?clientId=...``
connection open from then on and records every message, so no event of a prompt is missed.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import requests
import websocket

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


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the test process dies (even by
    SIGKILL), so no server outlives a killed pytest."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _EventRecorder(threading.Thread):
    """Follows ``/ws?clientId=...``; appends ``{"type", "data", "t"}`` per message to ``events``.

    Binary messages (previews) are recorded as ``{"type": "binary", "data": {"event": int,
    "size": n}}``. Reconnects if the socket drops while the server lives.
    """

    def __init__(self, url: str):
        super().__init__(daemon=True, name="comfy-ws")
        self.url = url
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.error: str | None = None

    def run(self):
        while not self.stop.is_set():
            try:
                ws = websocket.create_connection(self.url, timeout=5)
            except Exception as e:  # server not up or gone
                self.error = repr(e)
                time.sleep(0.2)
                continue
            self.connected.set()
            ws.settimeout(0.5)
            try:
                while not self.stop.is_set():
                    try:
                        opcode, payload = ws.recv_data()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if opcode == websocket.ABNF.OPCODE_TEXT:
                        msg = json.loads(payload.decode("utf-8"))
                        event = {"type": msg.get("type"), "data": msg.get("data"), "t": time.time()}
                    elif opcode == websocket.ABNF.OPCODE_BINARY:
                        kind = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else -1
                        event = {"type": "binary", "data": {"event": kind, "size": len(payload)}, "t": time.time()}
                    elif opcode == websocket.ABNF.OPCODE_CLOSE:
                        break
                    else:
                        continue
                    with self.cond:
                        self.events.append(event)
                        self.cond.notify_all()
            except Exception as e:
                self.error = repr(e)
            finally:
                self.connected.clear()
                try:
                    ws.close()
                except Exception:
                    pass


class ComfyServer:
    """A started ComfyUI server. Use the ``comfy_server`` fixture rather than starting one."""

    def __init__(self, base_dir: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base_dir = Path(base_dir)
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = f"personalize-tests-{uuid.uuid4().hex[:8]}"
        self.http = requests.Session()
        self._ws = _EventRecorder(f"ws://127.0.0.1:{port}/ws?clientId={self.client_id}")
        self.startup_seconds = None

    # -- life cycle -----------------------------------------------------------------------------
    @classmethod
    def start(cls, base_dir, *, python: str | None = None, extra_args=(), startup_timeout: float = 180.0,
              env: dict | None = None) -> ComfyServer:
        base_dir = make_base_dir(Path(base_dir).resolve())
        link_pack(base_dir)
        comfy_path = find_comfyui()
        port = free_port()
        log_path = base_dir / "server.log"
        python = python or os.environ.get("PERSONALIZE_PYTHON") or sys.executable
        cmd = [
            python, str(comfy_path / "main.py"),
            "--cpu",
            "--listen", "127.0.0.1",
            "--port", str(port),
            "--base-directory", str(base_dir),
            "--disable-auto-launch",
            # The default database lives in the ComfyUI checkout (user/comfyui.db); keep it private.
            "--database-url", "sqlite:///:memory:",
            *extra_args,
        ]
        proc_env = dict(os.environ if env is None else env)
        proc_env["PYTHONUNBUFFERED"] = "1"
        proc_env.pop("PYTHONPATH", None)  # nothing of ours on the server's path but custom_nodes/
        log = open(log_path, "ab")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=str(base_dir), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=proc_env, preexec_fn=_die_with_parent)
        log.close()
        server = cls(base_dir, port, proc, log_path)
        atexit.register(server.stop)  # in case the fixture's finaliser never runs
        try:
            server._wait_ready(startup_timeout)
        except BaseException:
            server.stop()
            raise
        server.startup_seconds = time.perf_counter() - t0
        server._ws.start()
        if not server._ws.connected.wait(30):
            server.stop()
            raise RuntimeError(f"could not open {server._ws.url}: {server._ws.error}")
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                r = self.http.get(self.url + "/object_info", timeout=5)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the ws follower and the server process (SIGINT, then SIGTERM, then SIGKILL)."""
        self._ws.stop.set()
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.http.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.http.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self, node_class: str | None = None) -> dict:
        r = self.get("/object_info" + (f"/{node_class}" if node_class else ""))
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict, *, client_id: str | None = "default", extra_data: dict | None = None) -> str:
        """``POST /prompt``; returns the prompt id. Raises ``PromptValidationError`` on a 400."""
        body = {"prompt": prompt, "client_id": self.client_id if client_id == "default" else client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = self.post("/prompt", json=body)
        if r.status_code != 200:
            try:
                err = r.json()
            except ValueError:
                err = {"error": {"message": r.text}, "node_errors": {}}
            raise PromptValidationError(
                validation_error_message(err.get("error") or {}, err.get("node_errors") or {}), err)
        return r.json()["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        """``GET /history/<id>`` -> that entry (``{}`` while not done); without an id: all of it."""
        r = self.get("/history" + (f"/{prompt_id}" if prompt_id else ""))
        r.raise_for_status()
        data = r.json()
        return data.get(prompt_id, {}) if prompt_id else data

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt`` (for one prompt if ``prompt_id`` is given)."""
        r = self.post("/interrupt", json={"prompt_id": prompt_id} if prompt_id else {})
        r.raise_for_status()

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", json={"unload_models": unload_models, "free_memory": free_memory}).raise_for_status()

    def queue_state(self) -> dict:
        return self.get("/queue").json()

    def wait(self, prompt_id: str, timeout: float = 120.0, *, check: bool = True) -> dict:
        """Wait until the prompt finished (its ``executing`` with ``node: None`` on /ws, or its
        /history entry); return the /history entry. With ``check`` raises
        ``PromptExecutionError``/``PromptInterrupted`` if it did not succeed."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            with self._ws.cond:
                events = self._ws.events
                done = any(self._is_end(e, prompt_id) for e in events[seen:])
                seen = len(events)
                if not done:
                    self._ws.cond.wait(0.5)
            if done or (not self._ws.connected.is_set() and self.history(prompt_id)):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f} s; "
                                   f"last events: {self.events_for(prompt_id)[-5:]}\n{self.log_tail()}")
            if not self.alive:
                raise RuntimeError(f"ComfyUI died (exit {self.proc.returncode}):\n{self.log_tail()}")
        entry = {}
        for _ in range(50):  # task_done writes history just before the final `executing`
            entry = self.history(prompt_id)
            if entry:
                break
            time.sleep(0.1)
        if check:
            self.check(entry, prompt_id)
        return entry

    @staticmethod
    def _is_end(event: dict, prompt_id: str) -> bool:
        data = event.get("data")
        return (event.get("type") == "executing" and isinstance(data, dict)
                and data.get("node") is None and data.get("prompt_id") == prompt_id)

    def check(self, entry: dict, prompt_id: str = "") -> None:
        status = entry.get("status") or {}
        if status.get("status_str") == "success":
            return
        for event, data in status.get("messages", []):
            if event == "execution_error":
                raise PromptExecutionError(execution_error_message(data), data)
            if event == "execution_interrupted":
                raise PromptInterrupted(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})", data)
        raise PromptExecutionError(f"prompt {prompt_id} did not succeed: {status}", {})

    def run(self, prompt: dict, timeout: float = 120.0, *, check: bool = True) -> dict:
        """``queue`` then ``wait``."""
        return self.wait(self.queue(prompt), timeout, check=check)

    # -- events ---------------------------------------------------------------------------------
    @property
    def events(self) -> list[dict]:
        """Every /ws message so far: ``{"type", "data", "t"}``."""
        return self._ws.events

    def events_for(self, prompt_id: str, event_type: str | None = None) -> list[dict]:
        with self._ws.cond:
            events = list(self._ws.events)
        return [e for e in events
                if isinstance(e.get("data"), dict) and e["data"].get("prompt_id") == prompt_id
                and (event_type is None or e["type"] == event_type)]

    def wait_for_event(self, predicate, timeout: float = 60.0, start: int = 0) -> dict:
        """Block until an event (from index ``start``) satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        i = start
        with self._ws.cond:
            while True:
                while i < len(self._ws.events):
                    if predicate(self._ws.events[i]):
                        return self._ws.events[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching /ws event")
                self._ws.cond.wait(min(left, 0.5))

    # -- files and log --------------------------------------------------------------------------
    def install_model(self, kind: str, source, name: str | None = None) -> str:
        return install_model(self.base_dir, kind, source, name)

    def image_paths(self, entry: dict, node_id: str | None = None) -> list[Path]:
        return image_paths(entry, self.base_dir, node_id)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_mark(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", errors="replace")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def pack_import_line(self) -> str:
        """The line of ComfyUI's 'Import times for custom nodes' report that names the pack."""
        for line in self.log_text().splitlines():
            if line.rstrip().endswith(os.sep + PACK_DIR_NAME) and "seconds" in line:
                return line
        return ""
