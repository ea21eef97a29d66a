"""A caller limited to some models named another in the path behind an empty segment, another
case or an encoded slash, with an allowed model in the body: the gateway let it through, and an
upstream that merges slashes (nginx's default), ignores case or decodes %2F serves the path's."""

import pytest

from ratefleet.gateway.callers import Caller
from ratefleet.gateway.errors import GatewayRefusal
from ratefleet.gateway.translate import check_model

CALLER = Caller("c", "guest", None, frozenset({"gemini-1.5-flash", "gpt-4o-mini"}), 30, None, None, None)


@pytest.mark.parametrize("path", [
    "/v1beta/models//gemini-1.5-pro:generateContent",
    "/v1beta/Models/gemini-1.5-pro:generateContent",
    "/openai/Deployments/gpt-4o/chat/completions",
    "/openai/deployments//gpt-4o/chat/completions",
    "/v1beta/models%2Fgemini-1.5-pro:generateContent",
])
def test_a_path_model_hidden_by_shape_is_still_held_to_the_allow_list(path):
    with pytest.raises(GatewayRefusal) as refused:
        check_model(CALLER, {"model": "gpt-4o-mini"}, path=path)
    assert refused.value.status == 403


@pytest.mark.parametrize("path", ["/v1beta/models/gemini-1.5-flash:generateContent",
                                  "/openai/deployments/gpt-4o-mini/chat/completions"])
def test_allowed_path_models_still_pass(path):
    check_model(CALLER, {"model": "gpt-4o-mini"} if "openai" in path else {"contents": []}, path=path)
