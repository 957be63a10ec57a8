"""The planner's one error type: a bad input, named with its fix."""


class PlanInputError(ValueError):
    """An input the planner cannot use. The message names the field and says how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. To fix: {fix}")
