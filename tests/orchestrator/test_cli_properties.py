"""Property: any combination of `orch plan` flags, valid or not, ends with exit code 0 (a plan
fits), 1 (nothing fits) or 2 (bad input, one line on stderr) and never a traceback. Run in
process (orchestrator.cli.main), derandomised so CI explores the same combinations every time."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.orchestrator.inprocess import run_orch

MODELS = ["debug", "llama3.1-8b", "mixtral-8x7b", "gpt3-1.7b", "qwen2.5-7b", "nosuch", "/no/such.json", ""]
GPUS = ["h100-80gb", "a100-40gb", "rtx4090-24gb", "cpu", "v100-32gb", "b900", ""]
NUMBERS = st.sampled_from(["1", "2", "3", "4", "7", "8", "16", "64", "0", "-1", "abc", "1e3"])
CHOICES = {
    "--precision": ["bf16", "fp16", "fp32", "fp8", "int3"],
    "--optimizer": ["adamw", "sgd", "adamw-8bit", "lion", "nope"],
    "--attention": ["flash", "eager", "sparse"],
    "--recompute": ["none", "full", "selective", "half"],
    "--offload": ["none", "optimizer", "optimizer+params", "disk"],
    "--method": ["full", "lora", "qlora", "prefix", "prompt", "ia3", "bitfit", "mezo", "adapter", "dora"],
    "--lora-targets": ["all-linear", "q_proj,v_proj", "c_attn", "nope_proj", ""],
    "--quant": ["nf4", "fp4", "int8"],
    "--backend": ["deepspeed", "megatron", "jax"],
    "--seq-len": ["128", "256", "0", "-8", "abc"],
}
NUMERIC = ["--gpus", "--gpus-per-node", "--dp", "--tp", "--pp", "--cp", "--ep", "--zero", "--micro-batch", "--global-batch",
           "--interleave", "--lora-rank", "--prefix-length", "--num-virtual-tokens", "--top"]
SWITCHES = ["--sp", "--no-sp", "--paged-optimizer", "--explain", "--json", "--no-double-quant", "--trace"]


@st.composite
def plan_args(draw: st.DrawFn) -> list[str]:
    args = ["plan"]
    model = draw(st.sampled_from(MODELS))
    if model:
        args += ["--model", model]
    gpu = draw(st.sampled_from(GPUS))
    if gpu:
        args += ["--gpu", gpu]
    elif draw(st.booleans()):
        args += ["--cluster", draw(st.sampled_from(["cpu-2", "h100-8x8-ib", "dgx-a100", "nosuch"]))]
    for flag in draw(st.lists(st.sampled_from(NUMERIC), max_size=4, unique=True)):
        args += [flag, draw(NUMBERS)]
    for flag in draw(st.lists(st.sampled_from(sorted(CHOICES)), max_size=4, unique=True)):
        args += [flag, draw(st.sampled_from(CHOICES[flag]))]
    args += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    if draw(st.integers(0, 9)) == 0:
        args.append(draw(st.sampled_from(["--no-such-flag", "extra-positional", "--tp"])))
    return args


@settings(max_examples=2500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan_args())
def test_every_flag_combination_ends_cleanly(argv: list[str]) -> None:
    code, out, err = run_orch(argv)
    assert code in (0, 1, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, (argv, err[-2000:])
    if code == 2:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("orch: error:"), (argv, err)
