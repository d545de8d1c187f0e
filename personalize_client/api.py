"""A small client for one ComfyUI server: /object_info, /prompt, /ws, /history, /view, /interrupt."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlparse

import requests
import websocket


class ServerError(RuntimeError):
    """The server refused or could not be reached; the message says which and why."""


class PromptRejected(ServerError):
    """`POST /prompt` answered 400: the graph failed validation (`details` is the server's answer)."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not urlparse(url).netloc:
        raise ServerError(f"`--server` {url!r} is not a server address such as http://127.0.0.1:8188.")
    return url


def rejection_message(body: dict) -> str:
    error = body.get("error") or {}
    lines = [f"{error.get('message', 'the server refused the prompt')}: {error.get('details', '')}".rstrip(": ")]
    for node_id, node_error in (body.get("node_errors") or {}).items():
        for reason in node_error.get("errors", []):
            lines.append(f"  node {node_id} ({node_error.get('class_type')}): {reason.get('message')}: "
                         f"{reason.get('details')}")
    return "\n".join(lines)


class ComfyClient:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = normalize_url(url)
        self.timeout = timeout
        self.http = requests.Session()
        self.client_id = f"personalize-client-{uuid.uuid4().hex[:12]}"

    def _request(self, method: str, path: str, **kw) -> requests.Response:
        try:
            return self.http.request(method, self.url + path, timeout=kw.pop("timeout", self.timeout), **kw)
        except requests.RequestException as exc:
            raise ServerError(f"cannot reach ComfyUI at {self.url} ({type(exc).__name__}): is it running?") from exc

    def object_info(self) -> dict:
        r = self._request("GET", "/object_info")
        if r.status_code != 200:
            raise ServerError(f"{self.url}/object_info answered {r.status_code}.")
        return r.json()

    def connect(self) -> websocket.WebSocket:
        """Open /ws for this client id (before queueing, so no event is missed)."""
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            ws = websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as exc:
            raise ServerError(f"cannot open {ws_url}/ws: {exc}") from exc
        return ws

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = self._request("POST", "/prompt", json=body)
        if r.status_code != 200:
            try:
                details = r.json()
            except ValueError:
                details = {"error": {"message": r.text}}
            raise PromptRejected(rejection_message(details), details)
        return r.json()["prompt_id"]

    def history(self, prompt_id: str) -> dict:
        r = self._request("GET", f"/history/{prompt_id}")
        return r.json().get(prompt_id, {}) if r.status_code == 200 else {}

    def interrupt(self, prompt_id: str) -> None:
        """Stop this prompt: interrupt it if it runs, remove it from the queue if it waits."""
        self._request("POST", "/interrupt", json={"prompt_id": prompt_id})
        self._request("POST", "/queue", json={"delete": [prompt_id]})

    def download(self, item: dict, folder: Path) -> Path:
        """Fetch one output file ({filename, subfolder, type}) through /view into `folder`."""
        name = Path(item["filename"]).name
        subfolder = "/".join(p for p in str(item.get("subfolder", "")).replace("\\", "/").split("/") if p not in ("", ".", ".."))
        target = folder / subfolder / name
        query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                           "type": item.get("type", "output")})
        r = self._request("GET", f"/view?{query}", stream=True, timeout=300)
        if r.status_code != 200:
            raise ServerError(f"could not download {item['filename']} ({r.status_code}).")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as fh:
            for chunk in r.iter_content(1 << 20):
                fh.write(chunk)
        partial.replace(target)
        return target


def receive(ws: websocket.WebSocket, wait: float) -> dict | None:
    """The next JSON message of /ws within `wait` seconds ({type, data}), or None (binary previews skipped)."""
    ws.settimeout(wait)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            opcode, payload = ws.recv_data()
        except websocket.WebSocketTimeoutException:
            return None
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(payload.decode("utf-8"))
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ServerError("the server closed the websocket.")
    return None
