"""`python -m linearize.evaluate ...` is lm-eval's own command line with the model name "linearize" registered
and linearize's local tasks (linearize/suites/tasks, the checkout's eval/tasks) known by name:

    python -m linearize.evaluate run --model linearize --model_args pretrained=out/smollm2-hedgehog --tasks arc_easy
    python -m linearize.evaluate run --model linearize --model_args pretrained=out/smollm2-hedgehog,teacher=True --tasks austen_next_sentence
"""

import sys

from lm_eval.__main__ import cli_evaluate

from linearize.evaluate import harness  # noqa: F401  (registers the lm-eval model "linearize")
from linearize.evaluate.suites import LOCAL_TASKS_DIR


def main() -> None:
    asks_tasks = any(arg in ("--tasks", "-t") or arg.startswith("--tasks=") for arg in sys.argv)
    if asks_tasks and not any(arg.startswith("--include_path") for arg in sys.argv):
        sys.argv += ["--include_path", str(LOCAL_TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
