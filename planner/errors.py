"""The planner's one error type: a bad input, named with its fix."""


class PlanInputError(ValueError):
    """An input the planner cannot use. The message names the field and says how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. To fix: {fix}")


def error_detail(exc: BaseException, limit: int = 240) -> str:
    """A library's exception as one short line: its message's lines joined, wrappers' preambles
    ("Class validation error for validator ...:") dropped."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not (ln.endswith(":") and "validator" in ln)] or lines
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
