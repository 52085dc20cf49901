"""The Gradio app of ``tunelab ui``: the tabs wired to :mod:`.train_tab`, :mod:`.jobs`, :mod:`.chat` and the
CLI's own verb table (passed in by ``tunelab.cli``: the Data, Evaluate and Export tabs build their forms from
the verbs' options models and call the verbs' functions, so they do exactly what the CLI does).

Both label languages are served (``/en`` and ``/zh``, each linking to the other; ``/`` opens ``--lang``).
With accounts, every page and API route is behind Gradio's login (an unauthenticated request gets the
login page only).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import typing
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunelab.errors import UserError, require
from tunelab.eval.runs import filter_runs, list_runs, sort_runs
from tunelab.models.registry import ALIASES
from tunelab.rundocs import eval_headlines
from tunelab.ui import chat, form, train_tab
from tunelab.ui.jobs import Jobs
from tunelab.ui.labels import labels
from tunelab.ui.settings import UiOptions, check_bind
from tunelab.ui.workspace import Workspace

#: Options (of the CLI verbs) that name a file or folder: confined to the workspace.
PATH_OPTIONS = {"input", "out", "out_dir", "removed", "html", "json_out", "data", "config", "files", "train",
                "runs", "dir", "target", "run_a", "run_b", "benchmark", "benchmarks"}
#: The verbs the Data, Evaluate and Export tabs offer, by tab.
VERB_TABS = {"data": ("data inspect", "data clean", "data split", "data augment"),
             "evaluate": ("eval", "compare"), "export": ("export",)}
_CAPTURE = threading.Lock()


def serve(o: UiOptions, verbs: dict[str, Any]) -> None:
    """``tunelab ui``: check the bind address and the login, then serve until Ctrl-C."""
    accounts = check_bind(o)
    require("gradio", extra="ui", verb="tunelab ui")
    import uvicorn

    ws = Workspace(o.workspace)
    os.environ.setdefault("COLUMNS", "120")  # the verbs' rich tables, captured for the page
    os.chdir(ws.root)  # configs hold workspace-relative paths, as `tunelab train` run from the workspace reads them
    app = build_app(ws, verbs, accounts, o.lang)
    listening = _listen(o.host, o.port)  # before the address is printed: a browser opened at it connects at once
    print(f"tunelab ui: http://{o.host}:{o.port}/ (workspace {ws.root}{', login required' if accounts else ''})",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])


def _listen(host: str, port: int):
    """A TCP socket bound to ``host:port`` and listening (connections wait in its backlog until uvicorn serves
    them); a port in use is a one-line error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"--port {port}: {host}:{port} cannot be listened on ({err.strerror}). Stop what uses it, "
                        "or choose another --port") from None
    sock.listen(2048)
    return sock


def build_app(ws: Workspace, verbs: dict[str, Any], accounts: list[tuple[str, str]], lang: str = "en"):
    """The FastAPI app: the workbench in both languages, / redirecting to ``lang``."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    jobs = Jobs(ws)
    app = FastAPI()

    @app.get("/")
    def root():
        return RedirectResponse(f"/{lang}/")

    for code in ("en", "zh"):
        blocks = build_blocks(ws, jobs, verbs, code)
        gr.mount_gradio_app(app, blocks, path=f"/{code}", auth=accounts or None, ssr_mode=False,
                            allowed_paths=[str(ws.root)], footer_links=[])
    return app


def build_blocks(ws: Workspace, jobs: Jobs, verbs: dict[str, Any], lang: str):
    """The workbench page in one language."""
    import gradio as gr

    L = labels(lang)
    other = "zh" if lang == "en" else "en"
    with gr.Blocks(title=L["title"]) as blocks:
        gr.Markdown(f"## {L['title']} · `{ws.root}` · [{L['switch']}](/{other}/)")
        with gr.Tabs():
            with gr.Tab(L["train"], id="train"):
                train_ui(gr, ws, jobs, L)
            with gr.Tab(L["runs"], id="runs"):
                on_load, load_outputs = runs_ui(gr, ws, verbs, L)
            with gr.Tab(L["chat"], id="chat"):
                chat_ui(gr, ws, L)
            for tab in ("data", "evaluate", "export"):
                with gr.Tab(L[tab], id=tab):
                    for key in VERB_TABS[tab]:
                        if key in verbs:
                            verb_ui(gr, ws, key, verbs[key], L)
        blocks.load(on_load, outputs=load_outputs)
    return blocks


def _run_choices(ws: Workspace) -> list[str]:
    try:
        return ws.run_dirs("runs")
    except UserError:
        return []


def train_ui(gr, ws: Workspace, jobs: Jobs, L: dict[str, str]) -> None:
    """The Train tab: form, YAML, problems, buttons, live view."""
    schema = form.form_fields()
    fields: list[form.FormField] = []  # in the order the widgets are made (the handlers' inputs)
    widgets: list[Any] = []
    method_groups: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            files = gr.Dropdown(choices=ws.data_files(), multiselect=True, label=L["data_files"], elem_id="data-files")
            local = ", ".join(f"`{p}`" for p in ws.model_paths()) or "-"
            gr.Markdown(f"{L['models']}: {', '.join(f'`{a}`' for a in ALIASES)}; {L['in_workspace']}: {local}",
                        elem_id="model-choices")
            with gr.Accordion(L["settings"], open=True):
                for section in train_tab.SECTIONS:
                    members = [f for f in schema if f.section == section or (section == "method" and f.method)]
                    fields.extend(members)
                    if not members:
                        continue
                    with gr.Accordion(section, open=section in train_tab.OPEN):
                        for f in members:
                            if f.method is None:
                                widgets.append(train_tab.widget(gr, f))
                                continue
                            if f.method not in method_groups:
                                method_groups[f.method] = gr.Group(visible=f.method == "lora")
                            with method_groups[f.method]:
                                widgets.append(train_tab.widget(gr, f))
        with gr.Column(scale=2):
            yaml_box = gr.Code(label=L["yaml"], language="yaml", elem_id="config-yaml", interactive=False, max_lines=14)
            problems = gr.Textbox(label=L["problems"], lines=2, elem_id="problems", interactive=False)
            with gr.Row():
                dry = gr.Button(L["dry_run"], elem_id="btn-dry-run")
                start = gr.Button(L["start"], variant="primary", elem_id="btn-start")
            advice = gr.Textbox(label=L["dry_run"], lines=2, max_lines=20, elem_id="advice", interactive=False)
            live_view(gr, ws, jobs, L, fields, widgets, start)
            preview_btn = gr.Button(L["preview"], elem_id="btn-preview")
            highlighted = gr.HighlightedText(label=L["preview_help"], elem_id="preview",
                                             color_map={"loss": "green", "reject": "red", "info": "gray"})
    by_path = dict(zip([f.path for f in fields], widgets, strict=True))

    def refresh(*values):
        _, text, probs = train_tab.form_state(fields, ws, list(values))
        return text, probs or L["no_problems"]

    gr.on([w.change for w in widgets], refresh, inputs=widgets, outputs=[yaml_box, problems])
    files.change(lambda chosen: "[" + ", ".join(f"{{path: {c}}}" for c in chosen) + "]" if chosen else "",
                 inputs=files, outputs=by_path["data.train"])
    by_path["method.name"].change(lambda m: [gr.update(visible=k == m) for k in method_groups],
                                  inputs=by_path["method.name"], outputs=list(method_groups.values()))

    def do_dry(*values):
        tree, text, probs = train_tab.form_state(fields, ws, list(values))
        return probs if probs else train_tab.dry_run(ws, text)

    dry.click(do_dry, inputs=widgets, outputs=advice)
    preview_btn.click(lambda fs, m, t, o, n: _safe(train_tab.preview, ws, fs, m, t, o, n),
                      inputs=[files, by_path["model.path"], by_path["data.template"], by_path["data.train_on"],
                              by_path["data.max_length"]], outputs=highlighted)


def _safe(fn, *args, **kwargs):
    """Call ``fn``; a user error becomes the one-line message on the page (gr.Error)."""
    import gradio as gr

    try:
        return fn(*args, **kwargs)
    except UserError as err:
        raise gr.Error(str(err)) from None


def live_view(gr, ws: Workspace, jobs: Jobs, L, fields, widgets, start) -> None:
    """The run picker, stop / resume, and the live progress, curves, log and data summary (1 s timer)."""
    with gr.Row():
        run_pick = gr.Dropdown(choices=_run_choices(ws), label=L["run"], elem_id="run-pick", allow_custom_value=True)
        refresh_btn = gr.Button(L["refresh"], elem_id="btn-refresh")
        stop = gr.Button(L["stop"], variant="stop", elem_id="btn-stop")
        resume = gr.Button(L["resume"], elem_id="btn-resume")
        load = gr.Button(L["load_config"], elem_id="btn-load-config")
    progress = gr.Textbox(label=L["progress"], elem_id="progress", interactive=False)
    loss_plot = gr.LinePlot(x="step", y="value", color="series", label=L["loss"], elem_id="loss-plot", height=240)
    lr_plot = gr.LinePlot(x="step", y="value", color="series", label=L["lr"], elem_id="lr-plot", height=160,
                          y_axis_format=".1e")
    metric_plot = gr.LinePlot(x="step", y="value", color="series", label=L["task_metrics"], elem_id="metric-plot",
                              height=160)
    log = gr.Textbox(label=L["log"], lines=6, max_lines=6, elem_id="log-tail", interactive=False, autoscroll=True)
    summary = gr.Textbox(label=L["data_summary"], lines=6, max_lines=6, elem_id="data-summary", interactive=False)
    outputs = [progress, loss_plot, lr_plot, metric_plot, log, summary]
    timer = gr.Timer(1.0)
    timer.tick(lambda r: train_tab.live(jobs, r), inputs=run_pick, outputs=outputs, show_progress="hidden")
    run_pick.change(lambda r: train_tab.live(jobs, r), inputs=run_pick, outputs=outputs)
    refresh_btn.click(lambda: gr.update(choices=_run_choices(ws)), outputs=run_pick)

    def do_start(*values):
        tree, text, probs = train_tab.form_state(fields, ws, list(values))
        if probs:
            raise gr.Error(probs.splitlines()[0])
        run = _safe(jobs.start, tree, text)
        return gr.update(choices=_run_choices(ws) + [ws.relative(run)], value=ws.relative(run))

    start.click(do_start, inputs=widgets, outputs=run_pick)
    stop.click(lambda r: _safe(_stop, jobs, r), inputs=run_pick, outputs=progress)
    resume.click(lambda r: _safe(lambda: (jobs.resume(ws.resolve(r or "", "run")), r)[1]), inputs=run_pick,
                 outputs=run_pick)

    def do_load(r):
        path = _safe(ws.resolve, r or "", "run", must_exist=True) / "config.yaml"
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
        values = form.form_values(fields, tree or {})
        return [values[f.path] for f in fields]

    load.click(do_load, inputs=run_pick, outputs=widgets)


def _stop(jobs: Jobs, run_rel: str) -> str:
    run = jobs.ws.resolve(run_rel or "", "run")
    if not jobs.stop(run):
        raise UserError(f"{run_rel}: not running")
    return f"{run_rel}: stop requested (SIGINT); it stops after this step with a checkpoint"


def runs_ui(gr, ws: Workspace, verbs: dict[str, Any], L):
    """The Runs tab: registry table, filter / sort, overlaid curves, metrics side by side, report. Returns the
    page-load handler (fills the table) and its outputs."""
    import pandas as pd

    with gr.Row():
        filt = gr.Textbox(label=L["filter"], elem_id="runs-filter")
        sort = gr.Textbox(label=L["sort"], value="-date", elem_id="runs-sort")
        refresh = gr.Button(L["refresh"], elem_id="btn-runs-refresh")
    table = gr.Dataframe(label=L["runs"], elem_id="runs-table", interactive=False, show_search="filter")
    pick = gr.CheckboxGroup(choices=_run_choices(ws), label=L["pick_runs"], elem_id="runs-pick")
    overlay = gr.LinePlot(x="step", y="value", color="series", label=L["overlay"], elem_id="runs-overlay", height=300)
    compare = gr.Dataframe(label=L["compare_table"], elem_id="runs-compare", interactive=False)
    with gr.Row():
        sig_data = gr.Textbox(label="--data", elem_id="sig-data", scale=2)
        sig_limit = gr.Number(label="--limit", value=200, precision=0, elem_id="sig-limit", scale=1)
        sig = gr.Button(L["significance"], elem_id="btn-significance", scale=2)
    sig_out = gr.Textbox(label=L["output"], lines=6, max_lines=30, elem_id="sig-output", interactive=False)
    with gr.Row():
        report = gr.Button(L["report"], elem_id="btn-report")
        report_file = gr.File(label=L["report"], elem_id="report-file")

    def rows(f: str, s: str):
        filters = [x.strip() for x in (f or "").split(",") if x.strip()]
        data = _safe(lambda: sort_runs(filter_runs(list_runs(ws.root / "runs"), filters), s or "-date"))
        cols = ["name", "status", "date", "model", "method", "lr", "steps", "train_loss", "eval_loss", "tokens_per_s"]
        return pd.DataFrame([[_round(r.get(c)) for c in cols] for r in data], columns=cols), gr.update(
            choices=[f"runs/{r['name']}" for r in data])

    def chosen(names: list[str]):
        jobs = Jobs(ws)
        frames, table_rows = [], {}
        for name in names or []:
            st = jobs.state(ws.resolve(name, "runs"))
            frames += [(step, v, f"{name} {k}") for k in ("loss", "eval_loss") for step, v in st.curves.get(k, [])]
            table_rows[name] = {"state": st.state, "steps": st.step, "final loss": st.loss, "eval loss": st.eval_loss,
                                "tokens/s": st.tokens_per_s, **_headlines(ws.resolve(name, "runs"))}
        keys = list(dict.fromkeys(k for r in table_rows.values() for k in r))
        comp = pd.DataFrame([[k, *(_round(table_rows[n].get(k)) for n in table_rows)] for k in keys],
                            columns=["metric", *table_rows])
        curves = train_tab.typed_frame(pd.DataFrame(frames, columns=["step", "value", "series"])) if frames else None
        return curves, comp

    def do_report(names: list[str]):
        from tunelab.report.html import write_report

        if not names:
            raise gr.Error("runs: pick one or more runs first")
        return str(_safe(write_report, [ws.resolve(n, "runs") for n in names])[0])

    for trigger in (refresh.click, filt.submit, sort.submit):
        trigger(rows, inputs=[filt, sort], outputs=[table, pick])
    pick.change(chosen, inputs=pick, outputs=[overlay, compare])
    pick.change(lambda names: shared_eval_data(ws, names), inputs=pick, outputs=sig_data)
    sig.click(lambda names, data, n: _safe(significance, ws, verbs, names, data, n), inputs=[pick, sig_data, sig_limit],
              outputs=sig_out)
    report.click(do_report, inputs=pick, outputs=report_file)
    return lambda: rows("", "-date"), [table, pick]


def shared_eval_data(ws: Workspace, names: list[str]) -> str:
    """The validation file every picked run was configured with (``data.eval``), or "" when they do not share one."""
    seen = set()
    for name in names or []:
        path = ws.resolve(name, "runs") / "config.yaml"
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
        seen.add(tuple(spec.get("path") for spec in ((cfg or {}).get("data") or {}).get("eval") or []))
    return ",".join(seen.pop()) if len(seen) == 1 and () not in seen else ""


def significance(ws: Workspace, verbs: dict[str, Any], names: list[str], data: str, limit: Any) -> str:
    """``tunelab compare A B --data FILE``: both runs scored on the same rows, the paired test; its printout."""
    if len(names or []) != 2:
        raise UserError(f"runs: pick exactly two runs for the significance test (got {len(names or [])})")
    specs = verb_fields(verbs["compare"].options)
    values = {"run_a": names[0], "run_b": names[1], "data": data or "", "limit": limit}
    options = parse_verb_options(ws, "compare", verbs["compare"].options, specs,
                                 [values.get(name, form.shown_value(spec)) for name, spec, _ in specs])
    return run_verb(verbs["compare"], options)[0]


def _round(value: Any) -> Any:
    """Floats to 4 significant digits for the tables (the run's files keep every digit)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _headlines(run: Path) -> dict[str, Any]:
    return {f"eval {k}": v for k, v in eval_headlines(run).items()}


def chat_ui(gr, ws: Workspace, L) -> None:
    """The Chat tab: streamed replies from a run, optionally beside its base model."""
    with gr.Row():
        run = gr.Dropdown(choices=_run_choices(ws), label=L["run"], elem_id="chat-run", allow_custom_value=True)
        refresh = gr.Button(L["refresh"], elem_id="btn-chat-refresh")
        side = gr.Checkbox(label=L["compare_base"], value=False, elem_id="chat-compare-base")
        max_new = gr.Slider(1, 1024, value=48, step=1, label=L["max_new_tokens"], elem_id="chat-max-new")
        temp = gr.Slider(0, 2, value=0, step=0.05, label=L["temperature"], elem_id="chat-temperature")
    with gr.Row():
        tuned = gr.Chatbot(label=L["tuned"], elem_id="chat-tuned", height=360)
        base = gr.Chatbot(label=L["base"], elem_id="chat-base", height=360, visible=False)
    with gr.Row():
        msg = gr.Textbox(label=L["message"], elem_id="chat-message", scale=4)
        send = gr.Button(L["send"], variant="primary", elem_id="btn-send", scale=1)
        clear = gr.Button(L["clear"], elem_id="btn-clear", scale=1)

    def respond(text, run_rel, both, n, t, hist_a, hist_b):
        if not (text or "").strip():
            raise gr.Error("message: empty. Type a message")
        path = _safe(ws.resolve, run_rel or "", "run", must_exist=True)
        hist_a, hist_b = list(hist_a or []), list(hist_b or [])
        asked = [{"role": m["role"], "content": _text(m["content"])} for m in hist_a] + [{"role": "user", "content": text}]
        hist_a += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        try:
            for reply in chat.stream_reply(path, asked, max_new_tokens=int(n), temperature=float(t)):
                hist_a[-1]["content"] = reply
                yield "", hist_a, hist_b
            hist_a[-1]["content"] = _shown(hist_a[-1]["content"])
            if both:
                asked_b = [{"role": m["role"], "content": _text(m["content"])} for m in hist_b] + [asked[-1]]
                hist_b += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
                for reply in chat.stream_reply(path, asked_b, base=True, max_new_tokens=int(n), temperature=float(t)):
                    hist_b[-1]["content"] = reply
                    yield "", hist_a, hist_b
                hist_b[-1]["content"] = _shown(hist_b[-1]["content"])
            yield "", hist_a, hist_b
        except UserError as err:
            raise gr.Error(str(err)) from None

    for trigger in (send.click, msg.submit):
        trigger(respond, inputs=[msg, run, side, max_new, temp, tuned, base], outputs=[msg, tuned, base])
    side.change(lambda b: gr.update(visible=b), inputs=side, outputs=base)
    clear.click(lambda: ([], []), outputs=[tuned, base])
    refresh.click(lambda: gr.update(choices=_run_choices(ws)), outputs=run)


EMPTY_REPLY = "(empty reply: the model produced only whitespace or end of turn)"


def _shown(reply: str) -> str:
    """A reply as the chat shows it: an empty or whitespace-only one says so instead of an empty bubble."""
    return reply if reply.strip() else EMPTY_REPLY


def _text(content: Any) -> str:
    """A Chatbot message's text (Gradio 6 may hand back a list of parts)."""
    if isinstance(content, list):
        content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content == EMPTY_REPLY else str(content)  # the model is asked with what it really said


# ----------------------------------------------------------------------------- the CLI's verbs as forms


def verb_fields(options: type) -> list[tuple[str, Any, Any]]:
    """(name, FormField-like widget spec, default) of a verb's options model, without the CLI-only fields."""
    out = []
    for name, field in options.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") == "skip" or name in ("force", "json_out"):
            continue  # the UI never replaces a file (no --force); results are shown, not printed as JSON
        kind, choices, optional = form.widget_kind(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        out.append((name, form.FormField(name, "", default, kind, field.description or "", choices, optional),
                    default))
    return out


def parse_verb_options(ws: Workspace, key: str, options: type, specs, values: list[Any]):
    """The verb's options model from the widget values; paths confined to the workspace; one line per error."""
    raw: dict[str, Any] = {}
    for (name, spec, default), value in zip(specs, values, strict=True):
        value = form.parse_value(spec, value)
        if value is None or value == "" or value == default:
            continue
        if isinstance(value, str) and typing.get_origin(form.unwrap_optional(options.model_fields[name].annotation)[0]) is list:
            value = [v.strip() for v in value.split(",") if v.strip()]  # comma-separated, as on the command line
        if name in PATH_OPTIONS:
            for text in value if isinstance(value, list) else [value]:
                if name in ("target", "run_a", "run_b") and not _looks_like_path(ws, str(text)):
                    continue  # an alias or a hub id
                ws.resolve(str(text), f"{key} --{name.replace('_', '-')}")
        raw[name] = value
    try:
        return options.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        flag = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else key
        raise UserError(f"{key} {flag}: {e['msg']} (got {e.get('input')!r})") from None


def _looks_like_path(ws: Workspace, text: str) -> bool:
    return text.startswith((".", "/", "~")) or ".." in text or (ws.root / text).exists()


def run_verb(verb: Any, options: Any) -> tuple[str, Any]:
    """Call a CLI verb's function and its printer; (what it printed, its result as plain data)."""
    out = io.StringIO()
    with _CAPTURE, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = verb.run(options)
        if verb.show is not None:
            verb.show(result, options)
    text = "\n".join(line for line in out.getvalue().split("\n") if "\r" not in line)  # no progress bars
    return text, _plain(result)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def verb_ui(gr, ws: Workspace, key: str, verb: Any, L) -> None:
    """One CLI verb as a form: its options (from its options model), a button, what it printed and returned."""
    specs = verb_fields(verb.options)
    with gr.Accordion(f"tunelab {key} — {verb.help}", open=key in ("data inspect", "eval", "export")):
        widgets = [train_tab.widget(gr, spec) for _, spec, _ in specs]
        for w, (name, _, _) in zip(widgets, specs, strict=True):
            w.label = f"--{name.replace('_', '-')}"
            w.elem_id = f"v-{key.replace(' ', '-')}-{name}"
        button = gr.Button(f"tunelab {key}", variant="primary", elem_id=f"btn-{key.replace(' ', '-')}")
        printed = gr.Textbox(label=L["output"], lines=8, max_lines=30, elem_id=f"out-{key.replace(' ', '-')}",
                             interactive=False)
        result = gr.JSON(label=L["result"], elem_id=f"res-{key.replace(' ', '-')}")
        tables = gr.Dataframe(label=L["files"] if key == "export" else L["metrics"],
                              visible=key in ("eval", "compare", "export"), elem_id=f"tab-{key.replace(' ', '-')}",
                              interactive=False)
        confusion = gr.Dataframe(label=L["confusion"], visible=key == "eval", interactive=False,
                                 elem_id=f"confusion-{key.replace(' ', '-')}")

    def go(*values):
        try:
            options = parse_verb_options(ws, key, verb.options, specs, list(values))
            text, res = run_verb(verb, options)
        except UserError as err:
            raise gr.Error(str(err)) from None
        return text, res, result_table(ws, key, res), confusion_table(res)

    button.click(go, inputs=widgets, outputs=[printed, result, tables, confusion])


def result_table(ws: Workspace, key: str, res: Any):
    """The table a verb's result reads best as: eval's metrics per data source and system, or an export's files
    with their SHA-256 (from its SHA256SUMS manifest)."""
    import pandas as pd

    if key == "export" and isinstance(res, dict) and res.get("out"):
        sums = Path(res["out"]) / "SHA256SUMS"
        lines = sums.read_text(encoding="utf-8").splitlines() if sums.is_file() else []
        return pd.DataFrame([ln.split(None, 1)[::-1] for ln in lines if ln.strip()], columns=["file", "sha256"])
    rows = []
    for doc in res if isinstance(res, list) else []:
        for system, entry in ((doc.get("systems") or {}) if isinstance(doc, dict) else {}).items():
            for metric, value in _scalars(entry.get("metrics") or {}):
                rows.append([str(doc.get("name", "")), system, metric, _round(value)])
    return pd.DataFrame(rows, columns=["data", "system", "metric", "value"])


def _scalars(metrics: dict, prefix: str = ""):
    """(name, value) of a metrics mapping's numbers and words, one level of nesting as ``mode.metric``
    (generative classification scores ``constrained`` and ``generated``)."""
    for key, value in metrics.items():
        if isinstance(value, dict) and not prefix and key != "per_class":
            yield from _scalars(value, f"{key}.")
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            yield prefix + key, value


def _with_confusion(metrics: dict):
    """The metrics mappings (this one, or one nested level) that hold a confusion matrix."""
    for m in [metrics, *(v for v in metrics.values() if isinstance(v, dict))]:
        if m.get("confusion") and m.get("labels"):
            yield m


def confusion_table(res: Any):
    """The first classification result's confusion matrix (gold label rows, predicted columns), or None."""
    import pandas as pd

    for doc in res if isinstance(res, list) else []:
        for system, entry in ((doc.get("systems") or {}) if isinstance(doc, dict) else {}).items():
            for m in _with_confusion(entry.get("metrics") or {}):
                columns = [*m["labels"], "<unparsed>", "<other>"][: len(m["confusion"][0])]
                return pd.DataFrame([[f"{doc.get('name')} {system}: {gold}", *row]
                                     for gold, row in zip(m["labels"], m["confusion"], strict=False)],
                                    columns=["gold \\ predicted", *columns])
    return None
