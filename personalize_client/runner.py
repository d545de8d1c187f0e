"""Queue a prompt, follow it on /ws with a progress bar, download its outputs; fan sweeps over servers."""
from __future__ import annotations

import csv
import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .api import ComfyClient, ServerError, receive


@dataclass
class RunResult:
    status: str  # success | error | interrupted | rejected
    prompt_id: str = ""
    server: str = ""
    seconds: float = 0.0
    final_loss: float | None = None
    files: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    error: str = ""
    params: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"


class ProgressBar:
    """One terminal line: node, step/total, loss. Redrawn in place on a TTY, else printed per change."""

    def __init__(self, stream=None, label: str = "", width: int = 30):
        self.stream = stream or sys.stderr
        self.label, self.width = label, width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = ""

    def update(self, value: int, total: int, node: str = "", loss: float | None = None) -> None:
        filled = int(self.width * value / total) if total else 0
        text = f"{self.label}[{'#' * filled}{'.' * (self.width - filled)}] {value}/{total}"
        if node:
            text += f" node {node}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        if text == self.last:
            return
        self.last = text
        if self.tty:
            self.stream.write("\r" + text.ljust(100))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def _error_text(data: dict) -> str:
    return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
            f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")


def _wait_in_history(client: ComfyClient, prompt_id: str, timeout: float) -> None:
    """Poll /history until the prompt has an outcome. Used after Ctrl-C: the signal may have cut a websocket
    frame in half, so the socket can no longer be read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.history(prompt_id).get("status", {}).get("status_str"):
            return
        time.sleep(0.2)


def follow(client: ComfyClient, ws, prompt_id: str, bar: ProgressBar | None, timeout: float) -> tuple[str, float | None, str]:
    """Read /ws until the prompt ends; return (status, last loss, error message)."""
    deadline = time.monotonic() + timeout
    loss, status, error, node = None, "", "", ""
    while not status:
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")
        message = receive(ws, 2.0)
        if message is None:
            entry = client.history(prompt_id)  # a missed end event: history has the outcome
            if entry.get("status", {}).get("completed") is not None and entry.get("status", {}).get("status_str"):
                status = entry["status"]["status_str"]
            continue
        kind, data = message.get("type"), message.get("data") or {}
        if not isinstance(data, dict) or data.get("prompt_id") not in (prompt_id, None):
            continue
        if kind == "executing" and data.get("prompt_id") == prompt_id:
            if data.get("node") is None:
                status = status or "success"
            else:
                node = str(data["node"])
        elif kind == "progress" and bar is not None:
            bar.update(int(data.get("value", 0)), int(data.get("max", 0)), str(data.get("node") or node), loss)
        elif kind == "personalize.step":
            loss = float(data["loss"])
            if bar is not None:
                bar.update(int(data["step"]), int(data["total"]), str(data.get("node") or node), loss)
        elif kind == "execution_error" and data.get("prompt_id") == prompt_id:
            status, error = "error", _error_text(data)
        elif kind == "execution_interrupted" and data.get("prompt_id") == prompt_id:
            status, error = "interrupted", f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return status, loss, error


def _outcome(entry: dict, status: str, error: str) -> tuple[str, str]:
    """The final status from /history, which is authoritative."""
    record = entry.get("status") or {}
    for event, data in record.get("messages", []):
        if event == "execution_error":
            return "error", _error_text(data)
        if event == "execution_interrupted":
            return "interrupted", f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    if record.get("status_str") == "success":
        return "success", ""
    return (status if status != "success" else "error"), error or f"the prompt did not succeed: {record}"


def run_prompt(client: ComfyClient, prompt: dict, *, out_dir: Path | None, timeout: float = 24 * 3600,
               bar: ProgressBar | None = None, params: dict | None = None, on_queued=None) -> RunResult:
    """Queue `prompt` on `client`'s server, follow it to the end, and download its outputs to `out_dir`.

    Ctrl-C interrupts the prompt on the server (or takes it off the queue) before it propagates.
    `on_queued(prompt_id)` is called once the server accepted the prompt.
    """
    started = time.perf_counter()
    ws = client.connect()
    result = RunResult(status="", server=client.url, params=dict(params or {}))
    try:
        result.prompt_id = client.queue(prompt)
        if on_queued is not None:
            on_queued(result.prompt_id)
        try:
            status, result.final_loss, result.error = follow(client, ws, result.prompt_id, bar, timeout)
        except KeyboardInterrupt:
            client.interrupt(result.prompt_id)
            try:  # wait until the server has stopped it (a training node writes its checkpoint first)
                _wait_in_history(client, result.prompt_id, 120)
            except KeyboardInterrupt:  # a second Ctrl-C leaves at once
                pass
            raise
    finally:
        try:
            ws.close()
        except Exception:  # noqa: BLE001  a socket left mid-frame by Ctrl-C must not hide the interrupt
            pass
        if bar is not None:
            bar.close()
    entry = {}
    for _ in range(50):  # history is written just before the final `executing` event
        entry = client.history(result.prompt_id)
        if entry.get("status"):
            break
        time.sleep(0.1)
    result.status, result.error = _outcome(entry, status, result.error)
    result.seconds = time.perf_counter() - started
    for node_id, outputs in (entry.get("outputs") or {}).items():
        for items in outputs.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item and out_dir is not None:
                    result.files.append(str(client.download(item, out_dir / result.prompt_id)))
                elif isinstance(item, str):
                    result.texts.append(f"node {node_id}: {item}")
    return result


# -- sweeps over several servers ---------------------------------------------------------------------

def run_sweep(servers: list[str], prompts: list[tuple[dict, dict]], *, out_dir: Path | None, timeout: float,
              log=print) -> list[RunResult]:
    """Run every (params, prompt) once, one at a time per server, all servers in parallel."""
    todo: queue.Queue = queue.Queue()
    for index, (params, prompt) in enumerate(prompts):
        todo.put((index, params, prompt))
    results: list[RunResult | None] = [None] * len(prompts)
    running: dict[str, tuple[ComfyClient, str]] = {}  # server -> (client, prompt id), to stop on Ctrl-C
    stopping = threading.Event()

    def worker(url: str) -> None:
        client = ComfyClient(url)
        while not stopping.is_set():
            try:
                index, params, prompt = todo.get_nowait()
            except queue.Empty:
                return
            log(f"run {index + 1}/{len(prompts)} on {client.url}: {params}")
            try:
                results[index] = run_prompt(client, prompt, out_dir=out_dir, timeout=timeout, params=params,
                                            on_queued=lambda pid: running.__setitem__(url, (client, pid)))
            except ServerError as exc:
                results[index] = RunResult(status="rejected", server=client.url, error=str(exc), params=params)
            log(f"run {index + 1} {results[index].status}" + (f": {results[index].error}" if results[index].error else ""))

    threads = [threading.Thread(target=worker, args=(url,), daemon=True) for url in servers]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        stopping.set()
        for client, prompt_id in list(running.values()):
            client.interrupt(prompt_id)
        raise
    return [r for r in results if r is not None]


def results_table(results: list[RunResult]) -> str:
    """A plain-text table: run, parameters, server, status, final loss, seconds, artifacts."""
    rows = [["run", "params", "server", "status", "final_loss", "seconds", "artifacts"]]
    for i, r in enumerate(results, 1):
        loss = "" if r.final_loss is None else f"{r.final_loss:.5f}"
        artifacts = "; ".join(r.files + [t.split(": ", 1)[-1] for t in r.texts]) or r.error[:80]
        rows.append([str(i), ", ".join(f"{k}={v}" for k, v in r.params.items()), r.server, r.status, loss,
                     f"{r.seconds:.1f}", artifacts])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def save_results(results: list[RunResult], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "results.json", folder / "results.csv"
    json_path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["params", "server", "status", "final_loss", "seconds", "prompt_id", "artifacts", "error"])
        for r in results:
            writer.writerow([json.dumps(r.params), r.server, r.status, r.final_loss, f"{r.seconds:.2f}", r.prompt_id,
                             " ".join(r.files + r.texts), r.error])
    return [json_path, csv_path]
