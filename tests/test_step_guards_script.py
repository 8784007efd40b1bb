"""benchmarks/step_guards.py: the guards of a compiled static-cache decode step, counted from Dynamo's guard log, and
the time per generated token, for a teacher and its student."""

from tests.tiny import benchmark_script

step_guards = benchmark_script("step_guards")


def test_guards_are_counted_per_layer_and_a_student_guards_its_states():
    rows = {(entry, layers): step_guards.measure(entry, layers, new_tokens=2, repeats=1)
            for entry in ("teacher", "hedgehog_swa:window=4") for layers in (1, 2)}
    for (entry, layers), row in rows.items():
        assert row["model"] == entry and row["layers"] == layers and row["us_per_token_median"] > 0
    # Each layer adds its own guards (its weights; a student's its states and options too), more for the student's.
    teacher_layer = rows["teacher", 2]["guards"] - rows["teacher", 1]["guards"]
    student_layer = rows["hedgehog_swa:window=4", 2]["guards"] - rows["hedgehog_swa:window=4", 1]["guards"]
    assert 0 < teacher_layer < student_layer
