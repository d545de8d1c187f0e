// Live training view on every Personalize training node (any node with a `previews` input):
// loss chart (raw + smoothed, log toggle, LR on a second axis), preview gallery, it/s and ETA,
// Cancel, the resumable checkpoint after a cancel, and errors. History comes back after a page
// reload from GET /personalize/runs. No external libraries: the chart is drawn on a <canvas>.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { drawChart, formatDuration, formatNumber } from "./live_chart.js";

const EVENTS = ["personalize.start", "personalize.step", "personalize.preview", "personalize.checkpoint",
  "personalize.end", "personalize.error", "execution_error"];
const MAX_GALLERY = 4;

const STYLE = `
.personalize-live { display: flex; flex-direction: column; gap: 4px; font: 11px sans-serif; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border-radius: 6px; padding: 6px; box-sizing: border-box; overflow: hidden; }
.personalize-live .pl-head { display: flex; gap: 6px; align-items: center; }
.personalize-live .pl-status { flex: 1; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.personalize-live button { font: inherit; padding: 1px 8px; border-radius: 4px; cursor: pointer; }
.personalize-live .pl-chart { width: 100%; height: 150px; display: block; }
.personalize-live .pl-gallery { display: flex; gap: 4px; overflow-x: auto; min-height: 0; }
.personalize-live figure { margin: 0; display: flex; flex-direction: column; align-items: center; }
.personalize-live figure img { width: 84px; height: 84px; object-fit: contain; background: #000; border-radius: 3px; }
.personalize-live figcaption { max-width: 84px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; opacity: .8; }
.personalize-live .pl-note { word-break: break-all; }
.personalize-live .pl-note.error { color: #ff6b6b; }
`;

function injectStyle() {
  if (document.getElementById("personalize-live-style")) return;
  const style = document.createElement("style");
  style.id = "personalize-live-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function element(tag, className, parent) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  parent?.appendChild(el);
  return el;
}

function viewUrl(ref) {
  const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
  return api.apiURL(`/view?${query}`);
}

/** The open workflow's id (the frontend sends it with every queued prompt), or null for an unsaved, id-less graph. */
function workflowId() {
  const id = app.graph?.id;
  return id && !/^0{8}-0{4}-0{4}-0{4}-0{12}$/.test(id) ? String(id) : null;
}

/** Node ids repeat across workflows: a run belongs here when it came from this workflow, or from none (headless). */
function fromThisWorkflow(workflow) {
  const current = workflowId();
  return !workflow || !current || workflow === current;
}

function emptyRun(promptId) {
  return { prompt_id: promptId, status: "running", points: [], last: null, previews: [], checkpoint: null, end: null,
    error: null, preview_error: null, summary: {} };
}

/** The widget of one node: its state (a run as /personalize/runs returns it) and its DOM. */
class LiveView {
  constructor(node) {
    this.node = node;
    this.run = null;
    this.root = element("div", "personalize-live");
    const head = element("div", "pl-head", this.root);
    this.status = element("span", "pl-status", head);
    const logLabel = element("label", "", head);
    this.logScale = element("input", "", logLabel);
    this.logScale.type = "checkbox";
    this.logScale.className = "pl-log";
    this.logScale.checked = !!node.properties?.personalize_log_scale;
    logLabel.append(" log");
    this.logScale.addEventListener("change", () => {
      node.properties = { ...(node.properties ?? {}), personalize_log_scale: this.logScale.checked };
      this.draw();
    });
    this.cancel = element("button", "pl-cancel", head);
    this.cancel.textContent = "Cancel";
    this.cancel.title = "Stop training; a resumable checkpoint is written";
    this.cancel.addEventListener("click", () => this.requestCancel());
    this.canvas = element("canvas", "pl-chart", this.root);
    this.gallery = element("div", "pl-gallery", this.root);
    this.note = element("div", "pl-note", this.root);
    this.useCheckpoint = element("button", "pl-resume", this.root);
    this.useCheckpoint.textContent = "Resume from this checkpoint";
    this.useCheckpoint.title = "Put the checkpoint path into the `resume` input";
    this.useCheckpoint.addEventListener("click", () => this.fillResume());
    new ResizeObserver(() => this.draw()).observe(this.canvas);
    this.render();
  }

  // -- events -------------------------------------------------------------------------------
  onEvent(type, data) {
    if (type === "execution_error") {
      if (String(data.node_id) !== String(this.node.id)) return;
      this.ensureRun(data.prompt_id);
      this.run.status = "error";
      this.run.error = this.run.error ?? data.exception_message;
      return this.render();
    }
    if (String(data.node) !== String(this.node.id) || !fromThisWorkflow(data.workflow)) return;
    const kind = type.slice("personalize.".length);
    if (kind === "start") this.run = emptyRun(data.prompt_id);
    this.ensureRun(data.prompt_id);
    const run = this.run;
    if (kind === "start") run.summary = data;
    else if (kind === "step") {
      run.last = data;
      run.points.push([data.step, data.loss, data.lr]);
    } else if (kind === "preview" && data.error) run.preview_error = data.error;
    else if (kind === "preview") run.previews = [...run.previews, { step: data.step, images: data.images }].slice(-12);
    else if (kind === "checkpoint") {
      run.checkpoint = { path: data.path, step: data.step, reason: data.reason };
      if (data.reason === "cancel") run.status = "cancelled";
    } else if (kind === "end") {
      run.end = data;
      run.status = "finished";
    } else if (kind === "error") {
      run.error = data.message;
      run.status = "error";
    }
    this.render();
  }

  ensureRun(promptId) {
    if (!this.run || (promptId && this.run.prompt_id !== promptId)) this.run = emptyRun(promptId);
  }

  /** After a page reload: the newest run of this node from the server, unless live events are newer. */
  async restore() {
    if (this.node.id == null || this.node.id < 0) return;
    try {
      const query = new URLSearchParams({ node: String(this.node.id) });
      const workflow = workflowId();
      if (workflow) query.set("workflow", workflow);
      const response = await api.fetchApi(`/personalize/runs?${query}`);
      if (!response.ok) return;
      const [latest] = (await response.json()).runs ?? [];
      if (!latest) return;
      const live = this.run;
      if (live && live.prompt_id === latest.prompt_id && live.points.length >= latest.points.length) return;
      if (live && live.prompt_id !== latest.prompt_id && live.status === "running") return;
      this.run = latest;
      this.render();
    } catch (error) {
      console.warn("personalize: could not restore the training history", error);
    } finally {
      this.root.dataset.restored = String(Number(this.root.dataset.restored ?? 0) + 1); // restores answered so far
    }
  }

  async requestCancel() {
    if (!this.run || this.run.status !== "running") return;
    this.cancel.disabled = true;
    this.cancel.textContent = "Cancelling…";
    await api.fetchApi("/interrupt", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(this.run.prompt_id ? { prompt_id: this.run.prompt_id } : {}),
    });
  }

  fillResume() {
    const widget = this.node.widgets?.find((w) => w.name === "resume");
    if (widget && this.run?.checkpoint) {
      widget.value = this.run.checkpoint.path;
      widget.callback?.(widget.value);
      this.node.setDirtyCanvas?.(true, true);
    }
  }

  // -- drawing -------------------------------------------------------------------------------
  render() {
    const run = this.run;
    this.root.dataset.status = run?.status ?? "idle";
    this.root.dataset.points = String(run?.points.length ?? 0);
    this.root.dataset.step = String(run?.last?.step ?? 0);
    this.root.dataset.promptId = run?.prompt_id ?? "";
    this.cancel.style.display = run?.status === "running" ? "" : "none";
    if (run?.status === "running") {
      this.cancel.disabled = false;
      this.cancel.textContent = "Cancel";
    }
    this.status.textContent = this.statusText();
    this.note.textContent = this.noteText();
    this.note.classList.toggle("error", run?.status === "error");
    this.useCheckpoint.style.display = run?.checkpoint && run.status !== "running" && this.node.widgets?.some((w) => w.name === "resume") ? "" : "none";
    this.renderGallery();
    this.draw();
  }

  statusText() {
    const run = this.run;
    if (!run) return "Not trained yet: queue the prompt to see loss and previews here.";
    const last = run.last;
    const parts = [];
    if (last) {
      parts.push(`step ${last.step}/${last.total}`, `loss ${formatNumber(last.loss)}`, `lr ${formatNumber(last.lr)}`);
      if (last.it_per_s > 0) parts.push(`${last.it_per_s.toFixed(2)} it/s`);
      if (run.status === "running" && last.eta_s != null) parts.push(`ETA ${formatDuration(last.eta_s)}`);
    } else if (run.status === "running") parts.push("starting…");
    const label = { finished: "done", cancelled: "cancelled", error: "failed" }[run.status];
    return (label ? [label, ...parts] : parts).join(" · ");
  }

  noteText() {
    const run = this.run;
    if (!run) return "";
    if (run.status === "error") {
      const saved = run.checkpoint?.reason === "error" ? ` Resumable checkpoint: ${run.checkpoint.path}` : "";
      return `Error: ${run.error ?? "see the console"}${saved}`;
    }
    const previewNote = run.preview_error ? `Previews stopped: ${run.preview_error}. ` : "";
    if (run.status === "cancelled" && run.checkpoint)
      return `${previewNote}Cancelled at step ${run.checkpoint.step}. Resumable checkpoint: ${run.checkpoint.path}`;
    if (run.status === "finished" && run.end)
      return `${previewNote}Finished in ${formatDuration(run.end.seconds ?? 0)}. Checkpoint: ${run.end.checkpoint ?? run.checkpoint?.path ?? ""}`;
    return previewNote;
  }

  renderGallery() {
    const latest = this.run?.previews.at(-1);
    const key = latest ? `${this.run.prompt_id}:${latest.step}` : "";
    if (this.gallery.dataset.key === key) return;
    this.gallery.dataset.key = key;
    this.gallery.replaceChildren();
    for (const ref of (latest?.images ?? []).slice(0, MAX_GALLERY)) {
      const figure = element("figure", "", this.gallery);
      const img = element("img", "pl-preview", figure);
      img.src = viewUrl(ref);
      img.alt = img.title = `step ${latest.step}: ${ref.prompt ?? ""}`;
      element("figcaption", "", figure).textContent = `step ${latest.step} · ${ref.prompt ?? ""}`;
    }
  }

  draw() {
    drawChart(this.canvas, this.run?.points ?? [], { logScale: this.logScale.checked, total: this.run?.last?.total });
  }
}

const views = new Set();

// Register once even if the folder is served twice (e.g. the pack installed under two folder names).
const REGISTERED = Symbol.for("personalize.live_training");
if (!window[REGISTERED]) {
  window[REGISTERED] = true;
  app.registerExtension({
    name: "Personalize.LiveTraining",

    setup() {
      injectStyle();
      for (const type of EVENTS) {
        api.addEventListener(type, (event) => {
          for (const view of views) view.onEvent(type, event.detail ?? {});
        });
      }
      // A reconnected socket may have missed events: take the server's record.
      api.addEventListener("reconnected", () => views.forEach((view) => view.restore()));
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
      const optional = nodeData?.input?.optional ?? {};
      if (!nodeData?.name?.startsWith("Personalize") || !optional.previews) return;

      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        const view = new LiveView(this);
        this.personalizeLive = view;
        views.add(view);
        const widget = this.addDOMWidget("live_training", "personalize_live", view.root, {
          serialize: false, hideOnZoom: false, getMinHeight: () => 290,
        });
        widget.serialize = false; // not a node input: saved workflows keep their widget order
        this.setSize([Math.max(this.size[0], 420), Math.max(this.size[1], this.computeSize()[1])]);
        queueMicrotask(() => view.restore());
        return result;
      };

      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        const minimum = this.computeSize();
        if (this.size[1] < minimum[1]) this.setSize([Math.max(this.size[0], 420), minimum[1]]);
        this.personalizeLive?.restore();
        return result;
      };

      const onRemoved = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function () {
        views.delete(this.personalizeLive);
        return onRemoved?.apply(this, arguments);
      };
    },
  });
}
