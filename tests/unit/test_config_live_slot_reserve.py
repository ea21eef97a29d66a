"""dispatcher.priority_slots was said to apply live (868b793), but fleet_view took only policy and
priority_reserve from a pushed revision: a push of priority_slots = 0 (to turn the slot reserve
off) left every running leader on its own file's value."""

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.config_store import fleet_view

BASE = {"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"upstream": "u", "keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}}}


def test_a_pushed_priority_slots_is_the_one_a_process_runs():
    local = parse_config(BASE, source="local")
    pushed = parse_config({**BASE, "dispatcher": {"priority_slots": 0}}, source="pushed")
    assert local.dispatcher.priority_slots == 1
    assert fleet_view(local, pushed).dispatcher.priority_slots == 0
