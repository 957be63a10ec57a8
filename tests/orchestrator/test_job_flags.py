"""One set of flags: every flag that shapes a job (orchestrator.flags.JobFlags) is accepted by
`orch plan`, `orch launch` and `orch profile` and parses to the same value in each; what a command
cannot run is refused in one line before anything starts; bad fine-tuning input likewise."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from pathlib import Path

import pytest
import typer.main

from orchestrator import cli
from orchestrator import flags as F
from tests.orchestrator.inprocess import run_orch

COMMANDS = ("plan", "launch", "profile")


def _option(field: dataclasses.Field):  # type: ignore[type-arg]
    hint = typing.get_type_hints(F.JobFlags, include_extras=True)[field.name]
    return next(m for m in hint.__metadata__ if hasattr(m, "param_decls"))


def _sample(field: dataclasses.Field) -> tuple[list[str], object]:  # type: ignore[type-arg]
    """Arguments that set the flag to a value other than its default, and that value."""
    option = _option(field)
    # typer.Option("--name", ...) keeps its first declaration as ``default`` when annotated.
    decls = [d for d in (option.default, *option.param_decls) if isinstance(d, str) and d.startswith("--")]
    default = field.default
    if isinstance(default, bool) or (default is None and "/" in decls[0]):
        on, off = decls[0].split("/") if "/" in decls[0] else (decls[0], None)
        return ([off] if default else [on]), (not default if default is not None else True)
    base = typing.get_args(typing.get_type_hints(F.JobFlags, include_extras=True)[field.name])[0]
    kind = next((t for t in typing.get_args(base) if t is not type(None)), base)
    if isinstance(default, enum.Enum) or (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        enum_cls = type(default) if isinstance(default, enum.Enum) else kind
        value = next(m for m in enum_cls if m != default)
        return [decls[0], value.value], value
    if kind is int or isinstance(default, int):
        value = (default or 1) + 1
        return [decls[0], str(value)], value
    if kind is float or isinstance(default, float):
        return [decls[0], "0.25"], 0.25
    if kind is Path:
        return [decls[0], "some.json"], Path("some.json")
    return [decls[0], f"value-of-{field.name}"], f"value-of-{field.name}"


def test_every_job_flag_parses_the_same_in_plan_launch_and_profile() -> None:
    group = typer.main.get_command(cli.app)
    args, expected = [], {}
    for field in dataclasses.fields(F.JobFlags):
        a, value = _sample(field)
        args += a
        expected[field.name] = value
    assert len(expected) >= 38  # model, cluster, training, parallel plan and every fine-tuning flag
    for name in COMMANDS:
        ctx = group.commands[name].make_context(name, list(args))
        got = {k: ctx.params[k] for k in expected}
        assert got == expected, name


def test_the_three_commands_take_the_same_job_flags() -> None:
    group = typer.main.get_command(cli.app)
    shared = {f.name for f in dataclasses.fields(F.JobFlags)}
    for name in COMMANDS:
        params = {p.name for p in group.commands[name].params}
        assert shared <= params, (name, shared - params)


@pytest.mark.parametrize("command", ["launch", "profile"])
@pytest.mark.parametrize(("flags", "says"), [
    (["--backend", "megatron"], "--backend megatron"),
    (["--method", "all"], "--method all"),
    (["--method", "mezo"], "--method mezo"),
])
def test_a_flag_a_runner_cannot_honour_is_refused_in_one_line(command: str, flags: list[str], says: str) -> None:
    code, _, err = run_orch([command, "--model", "debug", "--cluster", "cpu-2", "--seq-len", "64", *flags])
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_inline_cluster_flags_launch_like_a_cluster_file(tmp_path: Path) -> None:
    """`--gpu cpu --gpus 2` is the same 2-worker gloo cluster as cluster_configs/cpu-2 for planning."""
    a = run_orch(["plan", "--model", "debug", "--gpu", "cpu", "--gpus", "2", "--seq-len", "64", "--json"])
    b = run_orch(["plan", "--model", "debug", "--cluster", "cpu-2", "--seq-len", "64", "--json"])
    assert a[0] == b[0] == 0
    pa, pb = json.loads(a[1])["plans"][0], json.loads(b[1])["plans"][0]
    dims = ("dp", "tp", "pp", "zero_stage", "micro_batch", "recompute", "offload")
    assert {k: pa[k] for k in dims} == {k: pb[k] for k in dims}
    assert pa["memory"] == pb["memory"]


# --- bad fine-tuning input: one line, exit 2, before Ray starts ---------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.launch.saved_model import saved_llama

    return saved_llama(tmp_path_factory.mktemp("m") / "llama", layers=1, hidden=32)


def _refused(argv: list[str]) -> str:
    import ray

    code, _, err = run_orch(argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not ray.is_initialized()
    return err


def _launch(model_dir: Path, *extra: str) -> list[str]:
    return ["launch", "--model", str(model_dir), "--gpu", "cpu", "--gpus", "2", "--seq-len", "32", "--steps", "2", *extra]


def test_unknown_method(model_dir: Path) -> None:
    assert "--method" in _refused(_launch(model_dir, "--method", "dora"))


def test_lora_targets_that_match_no_module(model_dir: Path) -> None:
    err = _refused(_launch(model_dir, "--method", "lora", "--lora-targets", "no_such_proj"))
    assert "no_such_proj" in err and "--lora-targets" in err


def test_qlora_without_bitsandbytes(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = cli.find_spec
    monkeypatch.setattr(cli, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    err = _refused(_launch(model_dir, "--method", "qlora"))
    assert "bitsandbytes is not installed" in err


@pytest.mark.parametrize(("lines", "says"), [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "{not json"], "line 2 is not JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], "line 2 is not a text, prompt/completion or chat record"),
    (['{"messages": [{"role": "user", "content": "no answer"}]}'], "line 1 is not"),
    (['{"text": "doc"}', '{"prompt": "a", "completion": "b"}'], "line 2 is a prompt record"),
])
def test_a_bad_dataset_line_is_refused_with_its_number(model_dir: Path, tmp_path: Path, lines: list[str], says: str) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert says in _refused(_launch(model_dir, "--method", "lora", "--dataset", str(data)))


def test_chat_records_need_a_chat_template(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    err = _refused(["launch", "--model", "debug", "--cluster", "cpu-2", "--seq-len", "32", "--method", "lora",
                    "--dataset", str(data)])
    assert "chat template" in err


@pytest.mark.parametrize(("flags", "says"), [
    (["--method", "qlora", "--zero", "3"], "--zero 3"),
    (["--method", "lora", "--tp", "2"], "--tp 2"),
    (["--method", "qlora", "--quant-block-size", "128"], "--quant-block-size 128"),
])
def test_fine_tuning_plans_the_trainer_does_not_run(model_dir: Path, flags: list[str], says: str) -> None:
    assert says in _refused(_launch(model_dir, *flags))
