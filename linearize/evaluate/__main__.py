"""`python -m linearize.evaluate ...` is lm-eval's own command line with the model name "linearize" registered:

    python -m linearize.evaluate run --model linearize --model_args pretrained=out/smollm2-hedgehog --tasks arc_easy
    python -m linearize.evaluate run --model linearize --model_args pretrained=out/smollm2-hedgehog,teacher=True ...
    python -m linearize.evaluate run --model linearize --model_args pretrained=DIR --include_path eval/tasks --tasks austen_next_sentence
"""

from lm_eval.__main__ import cli_evaluate

from linearize.evaluate import harness  # noqa: F401  (registers the lm-eval model "linearize")

if __name__ == "__main__":
    cli_evaluate()
