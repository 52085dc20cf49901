"""tunelab ui without a browser: schema -> form mapping, validation lines = the CLI's, workspace confinement,
the bind / login rule, and the login page in front of every route."""

from __future__ import annotations

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import describe_schema
from tunelab.errors import UserError
from tunelab.ui import form
from tunelab.ui.settings import UiOptions, check_bind
from tunelab.ui.workspace import Workspace


def test_every_config_field_appears_with_its_type_and_default():
    fields = {f.path: f for f in form.form_fields()}
    rows = [r for r in describe_schema() if not r[0].startswith("method.name=")]
    lists = {f.path for f in fields.values() if f.type_name == "list"}
    checked = 0
    for path, type_name, default, _doc in rows:
        if "[]." in path:  # a key inside a list / optional section: that section is one YAML box naming its keys
            top = path.split("[].")[0]
            first_key = path[len(top) + 3:].split("[")[0].split(".")[0]
            assert top in lists and first_key in fields[top].help, path
            continue
        f = fields[path]
        assert f.type_name == type_name, path
        if type_name != "list":  # describe_schema prints "[]" for an optional section; the form keeps None
            assert f.default_repr == default, path
        checked += 1
    assert checked > 120 and "method.name" in fields
    assert {fields["train.lr"].kind, fields["data.packing"].kind, fields["train.batch_size"].kind} == {"float", "bool", "int"}
    assert fields["train.precision"].choices == ("auto", "bf16", "fp16", "fp32")
    assert fields["method[lora].r"].method == "lora" and fields["train.max_steps"].optional


def _values(**changes):
    fields = form.form_fields()
    values = {f.path: form.shown_value(f) for f in fields}
    values.update(changes)
    return fields, values


def test_form_values_become_the_yaml_tunelab_train_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n')
    fields, values = _values(**{"model.path": "tiny-random-llama", "data.train": "[{path: d.jsonl, limit: 4}]",
                                "train.lr": 1e-3, "method.name": "full", "method[lora].r": 64, "train.betas": "[0.9, 0.99]"})
    tree = form.config_tree(fields, values)
    assert tree == {"model": {"path": "tiny-random-llama"}, "data": {"train": [{"path": "d.jsonl", "limit": 4}]},
                    "method": {"name": "full"}, "train": {"lr": 1e-3, "betas": [0.9, 0.99]}}  # lora's r not carried
    assert form.validate(tree, Workspace(tmp_path)) == []
    back = form.form_values(fields, yaml.safe_load(form.to_yaml(tree)))
    assert form.config_tree(fields, back) == tree


def test_validation_errors_are_the_cli_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fields, values = _values(**{"model.path": "tiny-random-llama", "data.train": "[{path: d.jsonl}]",
                                "train.batch_size": 0, "train.warmup_steps": 3, "train.warmup_ratio": 0.1})
    tree = form.config_tree(fields, values)
    shown = form.validate(tree, Workspace(tmp_path))
    (tmp_path / "c.yaml").write_text(form.to_yaml(tree))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    cli_lines = [ln.strip()[2:] for ln in capsys.readouterr().err.splitlines() if ln.strip().startswith("- ")]
    assert shown == cli_lines and any(ln.startswith("train.batch_size: ") for ln in shown)
    with pytest.raises(UserError, match=r"^data.eval: not valid YAML .*Fix the value$"):
        form.config_tree(fields, {**values, "data.eval": "[{path: x"})


def test_paths_are_confined_to_the_workspace(tmp_path):
    ws_dir = tmp_path / "ws"
    (ws_dir / "data").mkdir(parents=True)
    (ws_dir / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "secret.jsonl").write_text("{}\n")
    (ws_dir / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    ws = Workspace(ws_dir)
    assert ws.resolve("data/a.jsonl", "f", must_exist=True) == (ws_dir / "data" / "a.jsonl").resolve()
    assert ws.resolve(str(ws_dir / "data" / "a.jsonl"), "f") == (ws_dir / "data" / "a.jsonl").resolve()
    for bad, why in (("../secret.jsonl", "contains '..'"), ("data/../../secret.jsonl", "contains '..'"),
                     (str(tmp_path / "secret.jsonl"), "outside the workspace"), ("link.jsonl", "outside the workspace"),
                     ("", "empty path")):
        with pytest.raises(UserError, match=f"^field: .*{why}"):
            ws.resolve(bad, "field")
    assert ws.data_files() == ["data/a.jsonl"]  # the link out of the workspace is not a data file either
    (ws_dir / "models" / "m").mkdir(parents=True)
    (ws_dir / "models" / "m" / "config.json").write_text("{}")
    (ws_dir / "models" / "q.gguf").write_bytes(b"GGUF")
    assert ws.model_paths() == ["models/m", "models/q.gguf"]
    problems = form.workspace_problems({"data": {"train": [{"path": "../secret.jsonl"}]}, "model": {"path": "/etc"},
                                        "run": {"output_dir": "runs"}}, ws)
    assert [p.split(":")[0] for p in problems] == ["data.train.0.path", "model.path"]
    with pytest.raises(UserError, match="run.name: '../x' is not a usable name"):
        ws.name("../x", "run.name")


def test_non_loopback_host_needs_a_login(tmp_path):
    assert check_bind(UiOptions()) == []
    assert check_bind(UiOptions(host="::1")) == []
    with pytest.raises(UserError, match=r"^--host 0.0.0.0: .*Add --auth USER:PASS or --auth-file F"):
        check_bind(UiOptions(host="0.0.0.0"))
    assert check_bind(UiOptions(host="0.0.0.0", auth="ann:pw:x")) == [("ann", "pw:x")]
    (tmp_path / "auth").write_text("# accounts\nann:1\nbob:2\n")
    assert check_bind(UiOptions(host="10.0.0.5", auth_file=str(tmp_path / "auth"))) == [("ann", "1"), ("bob", "2")]
    with pytest.raises(UserError, match="expected USER:PASS"):
        check_bind(UiOptions(auth="nopassword"))
    assert main(["ui", "--host", "0.0.0.0", "--workspace", str(tmp_path)]) == 2


def test_the_port_listens_before_the_address_is_printed_and_a_busy_port_is_one_line():
    import socket

    from tunelab.ui.app import _listen

    sock = _listen("127.0.0.1", 0)
    try:  # listening: a client connects (and waits in the backlog) before any server loop runs
        socket.create_connection(sock.getsockname(), timeout=5).close()
        with pytest.raises(UserError, match=rf"^--port {sock.getsockname()[1]}: 127.0.0.1:\d+ cannot be listened on "
                                            r"\(Address already in use\)\. Stop what uses it, or choose another --port$"):
            _listen("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_without_login_a_request_gets_only_the_login_page(tmp_path):
    pytest.importorskip("gradio", reason="the [ui] extra is not installed")
    from fastapi.testclient import TestClient

    from tunelab.cli import VERBS
    from tunelab.ui.app import build_app

    client = TestClient(build_app(Workspace(tmp_path), VERBS, [("ann", "secret")]))
    page = client.get("/en/")  # the page's config says: login form, no components, no event handlers
    assert page.status_code == 200 and '"auth_required":true' in page.text and '"components":[]' in page.text
    assert "f-train-lr" not in page.text and "tiny-random-llama" not in page.text
    for route in ("/en/config", "/en/gradio_api/info", "/zh/config"):
        assert client.get(route).status_code == 401, route
    assert client.post("/en/login", data={"username": "ann", "password": "wrong"}).status_code >= 400
    assert client.post("/en/login", data={"username": "ann", "password": "secret"}).status_code == 200
    config = client.get("/en/config")
    assert config.status_code == 200 and "f-train-lr" in config.text and "f-train-lr" in client.get("/en/").text
