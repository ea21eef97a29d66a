"""The scheduler remembers which keys lack a model (schemas/job.py requested_model). On Azure
the upstream picks the deployment in the path and ignores the body's `model`: a job for a
deployment only some keys have, whose body named `gpt-4o`, marked the other keys as lacking
`gpt-4o` for 600 s, and every other caller's `gpt-4o` job then went to the remaining keys only."""

from ratefleet.schemas.job import HttpRequest, requested_model


def req(path, body):
    return HttpRequest(path=path, json=body)


def test_a_path_model_and_a_different_body_model_are_one_model_not_the_body_alone():
    lacking = requested_model(req("/openai/deployments/eu-only/chat/completions", {"model": "gpt-4o"}))
    other = requested_model(req("/openai/deployments/gpt-4o/chat/completions", {"model": "gpt-4o"}))
    assert other == "gpt-4o"
    assert lacking != other


def test_one_source_alone_is_unchanged_and_a_huge_name_is_not_remembered():
    assert requested_model(req("/v1/chat/completions", {"model": "gpt-4o"})) == "gpt-4o"
    assert requested_model(req("/v1beta/models/gemini-1.5-pro:generateContent", {"contents": []})) == "gemini-1.5-pro"
    assert requested_model(req("/v1/embeddings", {"input": "x"})) is None
    assert requested_model(req("/v1/chat/completions", {"model": "m" * 100_000})) is None
