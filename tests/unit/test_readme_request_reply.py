"""The README tells a Python caller where the answer's JSON body is (`response.json` is
pydantic's deprecated method, not the body) and what a repeated request id does."""

from __future__ import annotations

from pathlib import Path

from ratefleet.schemas import Result

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_names_the_python_attribute_of_the_json_body():
    result = Result.model_validate({"job_id": "j", "status": "succeeded", "tier": "vip",
                                    "response": {"status": 200, "json": {"a": 1}}})
    assert result.response.json_body == {"a": 1}
    assert callable(result.response.json)  # not the body: the README must say so
    text = README.read_text()
    assert "result.response.json_body" in text
    assert "same\n`id` again" in text or "same `id` again" in text
